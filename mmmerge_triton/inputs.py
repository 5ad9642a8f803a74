"""Input checks of the public API. Every check runs before anything is written, and names the argument."""
from __future__ import annotations

import functools
from operator import attrgetter, itemgetter
from typing import Sequence, Union

import numpy as np
import torch

class CountMismatch(ValueError):
    """The mask's true rows differ from the source rows. The API re-raises it in vLLM's words."""

    def __init__(self, num_rows: int, num_placeholders: int):
        super().__init__(f"Attempted to assign {num_rows} multimodal tokens to {num_placeholders} placeholders")
        self.num_rows, self.num_placeholders = num_rows, num_placeholders



NestedTensors = Union[torch.Tensor, Sequence["NestedTensors"]]

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes the Triton path moves (dst and src alike)."""
MERGE_DTYPES = (torch.float64, *TRITON_DTYPES)
"""The dtypes the API merges: float64 too, through the PyTorch paths (training code runs gradcheck in float64)."""

_MERGE_SET = set(MERGE_DTYPES)
_MERGE_NAMES = "float64, float32, float16 or bfloat16"
_dtype_of, _device_of, _layout_of = attrgetter("dtype"), attrgetter("device"), attrgetter("layout")
_first, _second = itemgetter(0), itemgetter(1)


def flatten_items(embeddings: NestedTensors, name: str) -> list[torch.Tensor]:
    """The tensors of a (nested) list/tuple, in order, each flattened to [rows, H] (a view). Empty nested
    lists contribute nothing (``[[]]`` is as empty as ``[]``)."""
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
    """How vLLM spells the rows of an embedding argument in its count error, e.g. "576 + 2 x 64". Empty
    lists spell nothing ("" for [] or [[]]; vLLM's torch.cat refuses them before any count)."""
    if isinstance(embeddings, torch.Tensor):
        return " x ".join(str(d) for d in embeddings.shape[:-1])
    return " + ".join(filter(None, map(count_expression, embeddings)))


def count_mismatch(num_rows: int, num_placeholders: int, expression: str | None = None) -> CountMismatch:
    """The count error, in vLLM's words (with its "576 + 576 = 1152" spelling when ``expression`` is given and
    not empty, as it is for an empty list). A CountMismatch (a ValueError) carrying both counts, so that a
    caller that knows the expression can spell an error raised by the registered ops its own way."""
    error = CountMismatch(num_rows, num_placeholders)
    if expression:
        error.args = (f"Attempted to assign {expression} = {num_rows} multimodal tokens to {num_placeholders} "
                      "placeholders",)
    return error


def items_dtype(items: list[torch.Tensor]) -> torch.dtype:
    """The dtype of a list of items: torch.cat's, the promotion of every item's dtype (not the first one's)."""
    return _promoted({item.dtype for item in items})  # not map(attrgetter): Dynamo traces this form


def _promoted(dtypes: set[torch.dtype]) -> torch.dtype:
    """torch.cat's dtype for items of these dtypes (a non-empty set)."""
    first, *rest = dtypes
    return functools.reduce(torch.promote_types, rest, first)


def as_rows(t: torch.Tensor) -> torch.Tensor | None:
    """A [rows, H] view of ``t`` [..., H] with unit column stride, without a copy; None if there is none."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return None
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def check_tensor(t, name: str) -> None:
    """A dense (strided) torch.Tensor: sparse and other layouts have no rows to address."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")


def check_flag(value, name: str) -> None:
    """A bool argument: a truthy string or int is a caller's mistake, not a request."""
    if type(value) is not bool:
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_path(path, choices: Sequence[str]) -> None:
    if not isinstance(path, str):
        raise TypeError(f"path must be a str ('auto' or one of {tuple(choices)}), got {type(path).__name__}")
    if path != "auto" and path not in choices:
        raise ValueError(f"path must be 'auto' or one of {tuple(choices)}, got {path!r}")


def check_dst(dst, name: str) -> None:
    """dst: [..., H] float64/float32/float16/bfloat16."""
    check_tensor(dst, name)
    if dst.dtype not in _MERGE_SET:
        raise TypeError(f"{name} must be {_MERGE_NAMES}, got {dst.dtype}")
    if dst.dim() < 1:
        raise ValueError(f"{name} must have shape [..., H], got a 0-dim tensor")


def check_writable(dst: torch.Tensor, name: str) -> None:
    """PyTorch's rule for inference tensors, which the Triton path (writing behind autograd) must apply itself."""
    if dst.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{name}: Inplace update to inference tensor outside InferenceMode is not allowed. You can make a clone "
            "to get a normal tensor before doing inplace update. See https://github.com/pytorch/rfcs/pull/17 for "
            "more details."
        )


def check_src(src, dst: torch.Tensor, src_name: str, dst_name: str) -> None:
    """src: [M, H] float64/float32/float16/bfloat16 on dst's device, H as dst's."""
    check_tensor(src, src_name)
    if src.dtype not in _MERGE_SET:
        raise TypeError(f"{src_name} must be {_MERGE_NAMES}, got {src.dtype}")
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
    """check_items_dtype's checks, returning the row counts [m_i] alone."""
    return check_items_dtype(items, dst, src_name, dst_name)[0]


def check_items_dtype(items: list[torch.Tensor], dst: torch.Tensor, src_name: str,
                      dst_name: str) -> tuple[list[int], torch.dtype | None]:
    """Checks each item as check_src does, and returns their row counts [m_i] and their dtype (items_dtype;
    None for no items). One pass per property, a few hundred ns per item on a fast host, where a call of
    check_src per item costs about 1 µs: engines pass hundreds of items. Any failure reruns the item by item
    checks, which raise the error naming the item (its index in the flattened list, and its shape)."""
    if plain_tensors(items):
        sizes = list(map(torch.Tensor.size, items))
        dtypes = set(map(_dtype_of, items))
        if (set(map(len, sizes)) == {2} and set(map(_second, sizes)) == {dst.shape[-1]} and dtypes <= _MERGE_SET
                and set(map(_device_of, items)) == {dst.device} and set(map(_layout_of, items)) == {torch.strided}):
            return list(map(_first, sizes)), _promoted(dtypes)
    single = len(items) == 1
    for i, item in enumerate(items):
        name = src_name if single else f"{src_name} item {i}" + (
            f" (shape {tuple(item.shape)})" if isinstance(item, torch.Tensor) else "")
        check_src(item, dst, name, dst_name)
    return [item.shape[0] for item in items], items_dtype(items) if items else None


def check_mask(mask, dst: torch.Tensor, mask_name: str, dst_name: str) -> None:
    """mask: bool of shape dst.shape[:-1], on the CPU or on dst's device."""
    check_tensor(mask, mask_name)
    if mask.dtype != torch.bool:
        raise TypeError(f"{mask_name} must be a bool tensor, got {mask.dtype}")
    if mask.shape != dst.shape[:-1]:
        if dst.dim() == 1:  # most often a caller's [N] rows passed as dst by mistake
            raise ValueError(
                f"{mask_name} has shape {tuple(mask.shape)}; {dst_name} is 1-D (one row of H={dst.shape[0]}), so "
                f"{mask_name} must be a 0-dim bool. For N rows pass {dst_name} as [N, H]"
            )
        raise ValueError(
            f"{mask_name} has shape {tuple(mask.shape)}; expected {tuple(dst.shape[:-1])} ({dst_name}.shape[:-1])"
        )
    if mask.device != dst.device and mask.device.type != "cpu":
        raise ValueError(f"{mask_name} is on {mask.device}; it must be on the CPU or on {dst_name}'s device ({dst.device})")


POSITION_DTYPES = (torch.int32, torch.int64)


def check_positions(positions, dst: torch.Tensor, name: str, dst_name: str) -> None:
    """positions: [M] int32/int64 on the CPU or on dst's device; dst must be [N, H] (a position is a row)."""
    check_tensor(positions, name)
    if positions.dtype not in POSITION_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor of row indices, got {positions.dtype}")
    if positions.dim() != 1:
        raise ValueError(f"{name} must have shape [M], got {tuple(positions.shape)}")
    if dst.dim() != 2:
        raise ValueError(f"{dst_name} must have shape [N, H] to be merged at row positions, got {tuple(dst.shape)}")
    if positions.device != dst.device and positions.device.type != "cpu":
        raise ValueError(f"{name} is on {positions.device}; it must be on the CPU or on {dst_name}'s device "
                         f"({dst.device})")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses that ``t`` may touch."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (last + 1) * t.element_size()


_OVERLAP_WORK = 1 << 16  # numpy's bound on the candidate solutions it tries; past it, "may share" counts as shared


class _Addresses:
    """A numpy view of a tensor's addresses (never of its bytes, which may be on a GPU): for np.shares_memory,
    which reads only the data pointer, shape, strides and item size."""

    def __init__(self, t: torch.Tensor):
        size = t.element_size()
        self.__array_interface__ = {"shape": tuple(t.shape), "strides": tuple(s * size for s in t.stride()),
                                    "typestr": f"|V{size}", "data": (t.data_ptr(), True), "version": 3}


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share bytes. Tensors of disjoint allocations (the common case) are told apart by
    their storages' address ranges (about 0.5 µs), then by the address spans the tensors touch, which decide
    for two contiguous tensors. Views interleaved in one span (column halves of one buffer, every other row)
    go to numpy's exact overlap solver (tens of µs; a problem past _OVERLAP_WORK counts as shared). PyTorch's
    own check refuses only dense tensors whose spans meet, and lets the others through unchecked."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    pa, pb = sa.data_ptr(), sb.data_ptr()
    if not (pa < pb + sb.nbytes() and pb < pa + sa.nbytes()):
        return False
    if a.device != b.device or a.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return False
    a0, a1 = _byte_span(a)
    b0, b1 = _byte_span(b)
    if not (a0 < b1 and b0 < a1):
        return False
    if a.is_contiguous() and b.is_contiguous():
        return True  # each covers its whole span
    try:
        return bool(np.shares_memory(np.asarray(_Addresses(a)), np.asarray(_Addresses(b)), max_work=_OVERLAP_WORK))
    except np.exceptions.TooHardError:
        return True


def any_overlaps(items: list[torch.Tensor], dst: torch.Tensor) -> bool:
    """Whether any item [m_i, H] (on dst's device) may share bytes with dst, by the address spans they touch:
    conservative, as its callers concatenate such items first, which is right either way. One pass per
    property over the list: engines pass hundreds of items."""
    if not items or dst.numel() == 0 or items[0].shape[1] == 0:
        return False
    d0, d1 = _byte_span(dst)
    starts = np.fromiter(map(torch.Tensor.data_ptr, items), dtype=np.int64, count=len(items))
    rows = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
    strides = np.array(list(map(torch.Tensor.stride, items)), dtype=np.int64).reshape(len(items), 2)
    sizes = np.fromiter(map(torch.Tensor.element_size, items), dtype=np.int64, count=len(items))
    last = (rows - 1) * strides[:, 0] + (items[0].shape[1] - 1) * strides[:, 1]
    ends = starts + (last + 1) * sizes
    return bool(np.any((rows > 0) & (starts < d1) & (d0 < ends)))
