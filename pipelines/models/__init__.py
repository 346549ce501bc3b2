"""Models built offline: open_clip CLIPs and image classifiers, weights loaded by name."""
