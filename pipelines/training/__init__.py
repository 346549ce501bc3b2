"""Training on Ray Train: the config and mode table, the driver-side data plan, and what each worker runs."""
