"""gradmimic pipelines: everything that runs on Ray (stages, spec, runner, CLI) and the benchmarks."""
