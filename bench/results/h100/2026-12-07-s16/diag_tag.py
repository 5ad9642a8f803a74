"""Where the one-launch select's time above a copy goes (run from the root of b895d76's tree on a GPU, as
`python diag_tag.py`, this file there; output diag_tag_b895d76.log). Calls, in the same rounds: copy; map (the row
map, then the row copy); select (two launches: the block counts, then the copy); select_ready (select's copy
alone, the counts written beforehand); select1 (the package's one launch at b895d76: release_state with 64 slot
counters); and the one-launch kernel body with the launch's tag given by the host and its end varied: no atomic
at all (tag), one relaxed add on one word (relaxed1), one acq_rel add on one word (acqrel1: 983fc19's
release_state without its reset), one acq_rel add on one of 64 words 128 bytes apart (acqrel64), and that with
the last program of each of the 64 adding to one top word (twolevel64: b895d76's release_state without its
reset)."""
import itertools
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, "bench")
from mmmerge_triton import scatter  # noqa: E402
from mmmerge_triton.kernel_config import cdiv, default_of_kind  # noqa: E402
from mmmerge_triton.kernels.mask_select_copy import published_counts  # noqa: E402
from mmmerge_triton.kernels.row_tiles import move_rows, put_tile  # noqa: E402
from mmmerge_triton.tools.cases import Case, make_inputs  # noqa: E402
from counted_scan import against_copy, check_against, figures  # noqa: E402
from scan_copy_bench import two_launch_and_copy  # noqa: E402
from select_copy import select_parts  # noqa: E402

DEV = torch.device("cuda", 0)
HIDDEN = 4096
ENDS = {"tag": 0, "relaxed1": 1, "acqrel1": 2, "acqrel64": 3, "twolevel64": 4}


@triton.jit(do_not_specialize=["tag", "n", "n_blocks", "n_rows"])
def tagged_select_kernel(dense_ptr, compact_ptr, mask_ptr, status_ptr, done_ptr, tag, n, n_blocks, n_rows, H,
                         stride_dense_row, stride_compact_row, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK: tl.constexpr, COUNTS: tl.constexpr, OWNED: tl.constexpr, SPINS: tl.constexpr,
                         END: tl.constexpr):
    pid = tl.program_id(0)
    j = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    compact_rows = compact_ptr + j[:, None] * stride_compact_row
    cols = tl.arange(0, BLOCK_H)
    first = tl.load(compact_rows + cols[None, :], mask=(j < n_rows)[:, None] & (cols < H)[None, :])
    b = tl.arange(0, COUNTS)
    count = published_counts(mask_ptr, status_ptr, pid, tag.to(tl.int64) << 32, n, n_blocks, BLOCK, COUNTS,
                             OWNED, SPINS)
    inclusive = tl.cumsum(count, axis=0)
    row_ok = (j < n_rows) & (j < tl.sum(count, axis=0))
    block = tl.sum((inclusive[None, :] <= j[:, None]).to(tl.int32), axis=1)
    rank = j - tl.sum(tl.where(b[None, :] == block[:, None], (inclusive - count)[None, :], 0), axis=1)
    i = block.to(tl.int64)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    is_true = (tl.load(mask_ptr + i, mask=row_ok[:, None] & (i < n), other=0) != 0).to(tl.int32)
    below = tl.cumsum(is_true, axis=1) - is_true
    dense_row = tl.sum(tl.where((is_true != 0) & (below == rank[:, None]), i, 0), axis=1)
    dense_rows = dense_ptr + dense_row[:, None] * stride_dense_row
    put_tile(dense_rows + cols[None, :], first, row_ok[:, None] & (cols < H)[None, :], 0)
    move_rows(dense_rows + BLOCK_H, compact_rows + BLOCK_H, row_ok, H - BLOCK_H, 0, BLOCK_H)
    if END == 1:
        tl.atomic_add(done_ptr, 1, sem="relaxed", scope="gpu")
    elif END == 2:
        tl.atomic_add(done_ptr, 1, sem="acq_rel", scope="gpu")
    elif END == 3:
        tl.atomic_add(done_ptr + 65 * 16 + (pid % 64) * 16, 1, sem="acq_rel", scope="gpu")
    elif END == 4:  # two levels: the last of each slot's programs adds to a top word (counters never reset here)
        slot = pid % 64
        size = (tl.num_programs(0) - slot + 63) // 64
        done = tl.atomic_add(done_ptr + 16 + slot * 16, 1, sem="acq_rel", scope="gpu")
        if done % size == size - 1:
            tl.atomic_add(done_ptr, 1, sem="acq_rel", scope="gpu")


tags = itertools.count(1)


def tagged(dst, src, flat, status, done, cfg, end):
    n, m = dst.shape[0], src.shape[0]
    sums = scatter.select_sums(n)
    owned = max(1, sums // scatter.SELECT_OWNERS)
    grid = (scatter.select_grid(n, m, cfg.rows),)
    def call():
        tagged_select_kernel[grid](dst, src, flat, status, done, next(tags), n, cdiv(n, scatter.SELECT_BLOCK), m,
                                   HIDDEN, dst.stride(0), src.stride(0), ROWS=cfg.rows, BLOCK_H=cfg.block_h,
                                   BLOCK=scatter.SELECT_BLOCK, COUNTS=max(sums, 32 * cfg.num_warps), OWNED=owned,
                                   SPINS=256, END=end, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return call


def case(n, density, pattern):
    dst, mask, src = make_inputs(Case(n, HIDDEN, density, pattern, mask="gpu"), DEV)
    flat, m = scatter.mask_bytes(mask), src.shape[0]
    cfg = default_of_kind(HIDDEN, fused=False, m=m)
    through_map, copy = two_launch_and_copy(dst, flat, src, cfg)
    counts = torch.empty(cdiv(n, scatter.SELECT_BLOCK), dtype=torch.int32, device=DEV)
    status = torch.zeros(cdiv(n, scatter.SELECT_BLOCK), dtype=torch.int64, device=DEV)
    done = torch.zeros(130 * 16, dtype=torch.int64, device=DEV)
    calls = {"copy": copy, "map": through_map,
             "select": lambda: scatter.mask_select_copy(dst, src, flat, counts, scatter.COPY, cfg),
             "select1": lambda: scatter.mask_select_copy(dst, src, flat, None, scatter.COPY, cfg)}
    calls |= {name: tagged(dst, src, flat, status, done, cfg, end) for name, end in ENDS.items()}
    parts = select_parts(dst, mask, src, flat, counts, cfg)
    calls["select_ready"] = parts["select_ready"]
    check_against(calls, "map", dst, f"the map's merge at N={n} {density:.0%} {pattern}")
    taken = figures(calls)
    print(f"N={n} {density:.0%} {pattern} (M={m}, grid {scatter.select_grid(n, m, cfg.rows)}, rows {cfg.rows}, "
          f"warps {cfg.num_warps}): {against_copy(taken)}", flush=True)


if __name__ == "__main__":
  print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
  for n, density, pattern in [(16384, 0.5, "blocks"), (32768, 0.5, "blocks"), (131072, 0.05, "blocks"),
                            (262144, 0.05, "blocks"), (65536, 0.05, "scattered"), (262144, 0.5, "blocks")]:
      case(n, density, pattern)
      torch.cuda.empty_cache()
