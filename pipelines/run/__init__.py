"""Running a spec: the typed spec and its configs, the stage registry, the runner, what a stage gets (its context), storage with atomic commits, errors and failpoints."""
