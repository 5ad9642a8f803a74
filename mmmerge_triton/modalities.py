"""Several modalities merged in one launch (api.merge_modalities_): the checks of its pairs and the row maps.

Omni models put image, video and audio rows in one sequence and merge them with one ``masked_scatter`` per
modality: each call a launch (and, out of place, a full copy of dst). Here the pairs' row maps are concatenated,
modality after modality, into one map whose j-th entry is the dst row of the j-th source row, and the sources
are read in place as the items of a list (items.merge_items: one multi_row_copy launch), or concatenated first
where they share no row layout (then one row_copy). An index is a bool mask of dst.shape[:-1] (its true rows in
order) or row positions [M_k] (dst [N, H]).

Rows named by two pairs: with CPU indexes the host sees every row and refuses the call before anything is written
(ValueError). With indexes on the device nothing is synced, and the LAST pair that names a row wins, as it would
after one masked_scatter_ per modality in list order: the earlier pairs' map entries for that row are set to -1,
which the bounded kernel skips. Their source rows are then unused, as are a device mask's source rows past its
true rows (a count mismatch moves the first min(K, M) rows, as masked_row_scatter_ does).

Calls the one launch cannot serve (gradients, torch.compile, subclasses, function transforms, a PyTorch path by
name, inputs the Triton path refuses, accumulate with device indexes, whose overlapping adds must all land), and
device indexes under path="auto" (their map costs more than the launches it saves), run the pairs one after another through masked_row_scatter_ /
indexed_row_scatter_, which give the same result there (the overlap check of CPU indexes comes first either way).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from . import inputs
from .dispatch import POSITION_PATHS
from .rowmap import MAX_ROWS, check_positions, host_positions, host_rows
from .scatter import mask_bytes, mask_to_rows

Pair = tuple[torch.Tensor, torch.Tensor]
"""(index, src): a bool mask of dst.shape[:-1] or row positions [M_k] int32/int64, and src [M_k, H]."""


def checked(dst, pairs, path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every argument checked, each named by its pair: (indexes, srcs)."""
    inputs.check_dst(dst, "dst")
    inputs.check_path(path, ("triton", "index_put", "masked_scatter", "index_copy"))
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a list of (index, src) pairs, got {type(pairs).__name__}")
    indexes, srcs = [], []
    for k, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"pairs[{k}] must be an (index, src) pair, got {type(pair).__name__}")
        index, src = pair
        name = f"pairs[{k}]"
        inputs.check_tensor(index, f"{name} index")
        if index.dtype == torch.bool:
            inputs.check_mask(index, dst, f"{name} mask", "dst")
        else:
            inputs.check_positions(index, dst, f"{name} positions", "dst")
            if path == "masked_scatter":
                raise ValueError(f"{name}: path='masked_scatter' takes masks; positions merge by one of "
                                 f"{POSITION_PATHS}")
        inputs.check_src(src, dst, f"{name} src", "dst")
        if index.dtype != torch.bool and index.shape[0] != src.shape[0]:
            raise ValueError(f"{name} positions has {index.shape[0]} entries; its src has {src.shape[0]} rows")
        indexes.append(index)
        srcs.append(src)
    if len({index.is_cpu for index in indexes}) > 1:
        raise ValueError("pairs: every index must be on the CPU, or every one on dst's device (one map is built "
                         "from all of them)")
    n = math.prod(dst.shape[:-1])
    if n > MAX_ROWS:
        raise ValueError(f"merge_modalities_ builds int32 row maps: at most {MAX_ROWS} rows of dst, got {n}")
    return indexes, srcs


def host_map(dst, indexes, srcs) -> np.ndarray:
    """The concatenated map [sum M_k] int32 of host indexes (device ones copied: check_count's sync), each
    pair's count and the union checked: a mask with other than M_k true rows, a position out of range or
    repeated, or a row named by two pairs raises."""
    n = math.prod(dst.shape[:-1])
    parts, masks = [], []
    for k, (index, src) in enumerate(zip(indexes, srcs)):
        if index.dtype == torch.bool:
            masks.append(index if index.is_cpu else index.cpu())
            rows = host_rows(masks[-1])
            if rows.size != src.shape[0]:
                raise ValueError(f"pairs[{k}]: {inputs.count_mismatch(src.shape[0], rows.size)}")
        else:
            rows = host_positions(index, n, f"pairs[{k}] positions").astype(np.int32)
        parts.append(rows)
    rows = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    if masks and len(masks) == len(parts):  # masks only: the union's count says it, O(N T)
        if np.count_nonzero(np.logical_or.reduce([mask.numpy().reshape(-1) for mask in masks])) == rows.size:
            return rows
    try:  # (which row two pairs name, for the error; or positions among the indexes)
        check_positions(rows, n)
    except ValueError as error:  # each part is unique on its own: a repeat is a row two pairs name
        raise ValueError(f"pairs overlap: {error.args[0].split(':')[0].replace('positions repeats', 'they name')} "
                         "more than once (with CPU indexes each row may be named by one pair)") from None
    return rows


def device_map(n: int, indexes, srcs) -> torch.Tensor:
    """The concatenated map [sum M_k] int32 on the device, no sync: each mask's rows (mask_to_rows: the first
    min(K_k, M_k)), each position list's positions; -1 where an entry is unused, out of range, or names a row
    that a later pair names too (the last pair wins). The bounded kernel skips -1."""
    device = indexes[0].device
    total = sum(src.shape[0] for src in srcs)
    rows = torch.full((max(total, 1),), -1, dtype=torch.int32, device=device)
    count = torch.empty(1, dtype=torch.int32, device=device)
    segments, start = [], 0
    for index, src in zip(indexes, srcs):
        segment = rows[start: start + src.shape[0]]
        if index.dtype == torch.bool:
            if segment.numel():
                mask_to_rows(mask_bytes(index), segment, count, segment.numel())
        else:
            inside = (index >= 0) & (index < n)
            segment.copy_(torch.where(inside, index, -1))
        segments.append(segment)
        start += src.shape[0]
    later = torch.zeros(n + 1, dtype=torch.bool, device=device)  # rows a later pair writes; slot n: none
    for k in range(len(segments) - 1, 0, -1):
        later.scatter_(0, torch.where(segments[k] >= 0, segments[k], n).long(), True)
        earlier = segments[k - 1]
        earlier.masked_fill_(later[torch.where(earlier >= 0, earlier, n).long()], -1)
    return rows[:total]
