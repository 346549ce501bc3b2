"""gradmimic: exact, near-free Grad-Mimic sample scores and reweighting (Huang et al., arXiv 2501.06708).

Pure torch: no Ray, no torch.distributed.  Cross-rank work is passed in as a ``gather`` callable.  Names load on
first use (PEP 562), so numpy-only parts such as :mod:`gradmimic.binarize` do not import torch.
"""

import importlib
import importlib.metadata
import os

VERSION_ENV = "GRADMIMIC_VERSION"  # set by `gradmimic submit --ship-package`, where the job's nodes run the source


def _version() -> str:
    """The installed distribution's version (pyproject.toml), or the submitting machine's for shipped source."""
    try:
        return importlib.metadata.version("gradmimic")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get(VERSION_ENV):
            return os.environ[VERSION_ENV]
        raise RuntimeError(f"gradmimic is not installed here and {VERSION_ENV} is not set: install it "
                           "(pip install), or submit with --ship-package") from None


__version__ = _version()  # read once

_WHERE = {
    "clip_per_sample_loss": "clip_loss", "projection_sqnorms": "clip_loss",
    "LinearSite": "linear_site", "capture_linear_sites": "linear_site", "find_parameters": "linear_site",
    "GradMimic": "mimic", "StepResult": "mimic", "jacobian_sqnorms": "mimic", "jvp_dots": "mimic",
    "ClipBatch": "open_clip_sites", "ClipSites": "open_clip_sites",
    "METHODS": "scores", "batch_weights": "scores", "global_softmax": "scores", "mimic_scores": "scores",
    "load_state_dict": "task_vector", "reference_tensors": "task_vector", "task_vectors": "task_vector",
    "RULES": "weighting", "Weighting": "weighting",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'gradmimic' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
