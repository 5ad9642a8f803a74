"""Input checks of the public API. Every check runs before anything is written, and names the argument."""
from __future__ import annotations

from operator import attrgetter, itemgetter
from typing import Sequence, Union

import torch

NestedTensors = Union[torch.Tensor, Sequence["NestedTensors"]]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_FLOAT_SET = set(FLOAT_DTYPES)
_dtype_of, _device_of = attrgetter("dtype"), attrgetter("device")
_first, _second = itemgetter(0), itemgetter(1)


def flatten_items(embeddings: NestedTensors, name: str) -> list[torch.Tensor]:
    """The tensors of a (nested) list/tuple, in order, each flattened to [rows, H] (a view)."""
    if isinstance(embeddings, (list, tuple)) and plain_tensors(embeddings) \
            and set(map(torch.Tensor.dim, embeddings)) == {2}:
        return list(embeddings)  # the common case, a flat list of [m_i, H] tensors: no call per item
    if isinstance(embeddings, torch.Tensor):
        if embeddings.dim() < 2:
            raise ValueError(f"{name} must have shape [..., H] with at least 2 dims, got {tuple(embeddings.shape)}")
        return [embeddings if embeddings.dim() == 2 else embeddings.flatten(0, -2)]
    if not isinstance(embeddings, (list, tuple)):
        raise TypeError(f"{name} must be a tensor or a (nested) list/tuple of tensors, got {type(embeddings).__name__}")
    return [t for item in embeddings for t in flatten_items(item, name)]


def count_expression(embeddings: NestedTensors) -> str:
    """How vLLM spells the rows of an embedding argument in its count error, e.g. "576 + 2 x 64"."""
    if isinstance(embeddings, torch.Tensor):
        return " x ".join(str(d) for d in embeddings.shape[:-1])
    return " + ".join(count_expression(inner) for inner in embeddings)


def count_mismatch(num_rows: int, num_placeholders: int, expression: str | None = None) -> ValueError:
    """The count error, in vLLM's words (with its "576 + 576 = 1152" spelling when ``expression`` is given)."""
    lhs = str(num_rows) if expression is None else f"{expression} = {num_rows}"
    return ValueError(f"Attempted to assign {lhs} multimodal tokens to {num_placeholders} placeholders")


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_dst(dst, name: str) -> None:
    """dst: [..., H] float32/float16/bfloat16."""
    check_tensor(dst, name)
    if dst.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dst.dtype}")
    if dst.dim() < 1:
        raise ValueError(f"{name} must have shape [..., H], got a 0-dim tensor")


def check_src(src, dst: torch.Tensor, src_name: str, dst_name: str) -> None:
    """src: [M, H] float32/float16/bfloat16 on dst's device, H as dst's."""
    check_tensor(src, src_name)
    if src.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{src_name} must be float32, float16 or bfloat16, got {src.dtype}")
    if src.dim() != 2:
        raise ValueError(f"{src_name} must have shape [M, H], got {tuple(src.shape)}")
    if src.shape[1] != dst.shape[-1]:
        raise ValueError(f"{src_name} has hidden size {src.shape[1]}; {dst_name} has {dst.shape[-1]}")
    if src.device != dst.device:
        raise ValueError(f"{src_name} is on {src.device}; it must be on {dst_name}'s device ({dst.device})")


def plain_tensors(items) -> bool:
    """Whether every item is a torch.Tensor proper (no subclass): what the one-pass checks assume. Under
    torch.compile the item by item forms run instead (they trace; the one-pass forms do not)."""
    return not torch.compiler.is_compiling() and set(map(type, items)) == {torch.Tensor}


def check_items(items: list[torch.Tensor], dst: torch.Tensor, src_name: str, dst_name: str) -> list[int]:
    """Checks each item as check_src does, and returns their row counts [m_i]. One pass per property, a few
    hundred ns per item on a fast host, where a call of check_src per item costs about 1 µs: engines pass
    hundreds of items. Any failure reruns the item by item checks, which raise the error naming it."""
    if plain_tensors(items):
        sizes = list(map(torch.Tensor.size, items))
        if (set(map(len, sizes)) == {2} and set(map(_second, sizes)) == {dst.shape[-1]}
                and set(map(_dtype_of, items)) <= _FLOAT_SET and set(map(_device_of, items)) == {dst.device}):
            return list(map(_first, sizes))
    for item in items:
        check_src(item, dst, src_name, dst_name)
    return [item.shape[0] for item in items]


def check_mask(mask, dst: torch.Tensor, mask_name: str, dst_name: str) -> None:
    """mask: bool of shape dst.shape[:-1], on the CPU or on dst's device."""
    check_tensor(mask, mask_name)
    if mask.dtype != torch.bool:
        raise TypeError(f"{mask_name} must be a bool tensor, got {mask.dtype}")
    if mask.shape != dst.shape[:-1]:
        raise ValueError(
            f"{mask_name} has shape {tuple(mask.shape)}; expected {tuple(dst.shape[:-1])} ({dst_name}.shape[:-1])"
        )
    if mask.device != dst.device and mask.device.type != "cpu":
        raise ValueError(f"{mask_name} is on {mask.device}; it must be on the CPU or on {dst_name}'s device ({dst.device})")
