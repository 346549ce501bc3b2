"""gradmimic: exact, near-free Grad-Mimic sample scores and reweighting (Huang et al., arXiv 2501.06708).

Pure torch: no Ray, no torch.distributed.  Cross-rank work is passed in as a ``gather`` callable.
"""

from .clip_loss import clip_per_sample_loss, projection_sqnorms
from .linear_site import LinearSite, capture_linear_sites, find_parameters
from .mimic import GradMimic, StepResult, jacobian_sqnorms, jvp_dots
from .open_clip_sites import ClipBatch, ClipSites
from .scores import METHODS, batch_weights, global_softmax, mimic_scores
from .task_vector import load_state_dict, reference_tensors, task_vectors
from .weighting import RULES, Weighting

__version__ = "0.2.0"

__all__ = [
    "ClipBatch", "ClipSites", "GradMimic", "LinearSite", "METHODS", "RULES", "StepResult", "Weighting",
    "batch_weights", "capture_linear_sites", "clip_per_sample_loss", "find_parameters", "global_softmax",
    "jacobian_sqnorms", "jvp_dots", "load_state_dict", "mimic_scores", "projection_sqnorms", "reference_tensors",
    "task_vectors",
]
