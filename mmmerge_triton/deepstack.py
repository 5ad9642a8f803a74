"""Sparse deepstack: add visual features to the K visual rows of the hidden states, layer after layer.

Qwen3-VL adds a set of visual features to the hidden states after each of its first decoder layers. HF
clones the hidden states and does two bool-mask index operations per layer (each a host sync); vLLM and
SGLang scatter the features into a dense zero tensor [N, L*H] and add all N rows at every layer. Here the
mask's row map is built once per forward (a MergePlan) and each layer is one accumulate launch over the K
visual rows: no sync, no dense buffer, no clone in inference.
"""
from __future__ import annotations

import torch

from . import inputs
from .api import scatter
from .core import needs_grad
from .plan import MergePlan


def deepstack_add(hidden_states: torch.Tensor, visual_embeds: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """``hidden_states[visual rows] += visual_embeds``, the rows given by ``plan`` (built once per forward
    from the visual position mask).

    Args:
        hidden_states: [..., H] (e.g. [B, S, H]) float32/float16/bfloat16.
        visual_embeds: [K, H], one row per true entry of the plan's mask, in order.
        plan: MergePlan of the visual position mask (shape hidden_states.shape[:-1]).

    Returns:
        hidden_states, updated in place, when no gradient is needed (inference); otherwise a new tensor
        (out of place, so autograd keeps any saved copy of the input intact), differentiable in both.
    """
    inputs.check_tensor(hidden_states, "hidden_states")
    inputs.check_tensor(visual_embeds, "visual_embeds")
    if not isinstance(plan, MergePlan):
        raise TypeError(f"plan must be a MergePlan of the visual position mask, got {type(plan).__name__}")
    # Out of place where autograd needs the input (it may have saved it), in place otherwise.
    return scatter(hidden_states, plan.mask, visual_embeds, in_place=not needs_grad(hidden_states, visual_embeds),
                   accumulate=True, path="auto", plan=plan, check_count=False,
                   names=("hidden_states", "plan.mask", "visual_embeds"))
