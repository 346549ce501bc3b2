"""The stages a spec names: each a typed config and a function ``run_<stage>(cfg, ctx)``."""
