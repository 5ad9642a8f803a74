"""mmmerge_triton: the multimodal embedding merge of vision-language models as a Triton row copy.

``inputs_embeds[is_multimodal] = mm_embeds`` at copy bandwidth, with the dtype cast fused, no host sync,
and O(N) integers of extra memory. See README.md.
"""
import importlib.machinery
import importlib.util
import os
import sys


def _map_checkout_kernels() -> None:
    """Give ``mmmerge_triton.kernels`` its folder when this package is imported from a checkout.

    setup.py installs the top-level ``kernels/`` folder as ``mmmerge_triton.kernels``. That folder has no
    ``__init__.py`` on purpose: a namespace portion loses to any regular package of the same name, so from the
    repository root ``import kernels`` still finds Hugging Face's ``kernels`` (which transformers imports).
    Installed, the subpackage sits inside this folder and imports as usual. From a checkout (an editable
    install, whose finder maps only folders with an ``__init__.py``, or the root on ``sys.path``) it sits
    beside this folder instead, so it is registered here as the namespace package it is.
    """
    name = __name__ + ".kernels"
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    if name in sys.modules or importlib.util.find_spec(name) is not None or not os.path.isdir(folder):
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [folder]
    sys.modules[name] = importlib.util.module_from_spec(spec)


_map_checkout_kernels()

from .api import (explain, indexed_row_scatter, indexed_row_scatter_, masked_row_scatter,  # noqa: E402
                  masked_row_scatter_, merge_modalities_, merge_multimodal_embeddings)
from .deepstack import deepstack_add  # noqa: E402
from .kernel_config import PATHS, Decision, KernelConfig  # noqa: E402
from .plan import MergePlan  # noqa: E402
from .requests import merge_requests  # noqa: E402

__all__ = [
    "merge_multimodal_embeddings",
    "masked_row_scatter_",
    "masked_row_scatter",
    "indexed_row_scatter_",
    "indexed_row_scatter",
    "merge_modalities_",
    "MergePlan",
    "merge_requests",
    "deepstack_add",
    "explain",
    "Decision",
    "KernelConfig",
    "PATHS",
]
__version__ = "0.1.0"
