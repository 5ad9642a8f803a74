"""mmmerge_triton: the multimodal embedding merge of vision-language models as a Triton row copy.

``inputs_embeds[is_multimodal] = mm_embeds`` at copy bandwidth, with the dtype cast fused, no host sync,
and O(N) integers of extra memory. See README.md.
"""
from . import ops as _ops  # noqa: F401  (registers torch.ops.mmmerge_triton.*)
from .api import explain, masked_row_scatter, masked_row_scatter_, merge_multimodal_embeddings
from .deepstack import deepstack_add
from .dispatch import Decision
from .kernel_config import KernelConfig
from .paths import PATHS
from .plan import MergePlan
from .requests import merge_requests

__all__ = [
    "merge_multimodal_embeddings",
    "masked_row_scatter_",
    "masked_row_scatter",
    "MergePlan",
    "merge_requests",
    "deepstack_add",
    "explain",
    "Decision",
    "KernelConfig",
    "PATHS",
]
__version__ = "0.1.0"
