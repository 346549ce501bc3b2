"""``filter``: the keep rule, the stage driver and its Ray tasks."""
