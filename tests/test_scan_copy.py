"""mask_scan_copy (kernels/mask_scan_copy.py, mmmerge_triton/scan_copy.py) under the interpreter: rows moved as
PyTorch moves them, the scan workspace left ready by each launch, and the look-back read from planted status
words (the interpreter runs programs one after another, so a live look-back always finds its predecessor done).

Tensors sit inside guard buffers (tests/test_kernels.py's Guarded): a write out of bounds changes a guard.
"""
from __future__ import annotations

import pytest
import torch

from mmmerge_triton import scan_copy, scatter
from mmmerge_triton.kernel_config import KernelConfig
from mmmerge_triton.kernels.mask_scan_copy import DONE, GEN, HIGH, STATUS, TAG_PERIOD, TICKET, mask_scan_copy_kernel
from mmmerge_triton.scatter import ADD, COPY, GATHER

from .conftest import (DTYPE_PAIR_IDS, DTYPE_PAIRS, assert_bits_equal, assert_close_ulps, make_mask,
                       merge_tolerance, truncate_to_bf16)
from .test_kernels import Guarded

pytestmark = pytest.mark.skipif(not scatter.supports(torch.device("cpu")), reason="needs TRITON_INTERPRET=1")

MODES = {"copy": COPY, "add": ADD, "gather": GATHER}
N, H = 29, 37  # N: not a multiple of any ROWS below; H: a tail for BLOCK_H 16 and 32
CPU = torch.device("cpu")


def first_true(mask: torch.Tensor, j: int) -> torch.Tensor:
    """The mask of the first ``j`` true rows of ``mask`` (any nonzero byte true)."""
    flat = mask.view(torch.uint8) != 0
    keep = torch.zeros_like(flat)
    keep[flat.nonzero().flatten()[:j]] = True
    return keep


def pytorch_result(mode: int, dense: torch.Tensor, compact: torch.Tensor, mask: torch.Tensor):
    """(dense, compact) as PyTorch leaves them: the first j = min(K, M) true rows of ``mask`` take compact[:j]
    (``dst[mask] = src.to(dst.dtype)``, or ``index_put_(accumulate=True)``), or give them to it (a gather)."""
    moved = first_true(mask, compact.shape[0])
    j = int(moved.sum())
    dense, compact = dense.clone(), compact.clone()
    if mode == COPY:
        dense[moved] = compact[:j].to(dense.dtype)
    elif mode == ADD:
        dense.index_put_((moved,), compact[:j].to(dense.dtype), accumulate=True)
    else:
        compact[:j] = dense[moved].to(compact.dtype)
    return dense, compact


def assert_like_pytorch(mode: int, dense: Guarded, compact: Guarded, mask: torch.Tensor) -> None:
    """Bit for bit PyTorch's result, but where the interpreter rounds a cast into bf16 toward zero
    (conftest.merge_tolerance: then within its ulps of PyTorch's result from the source or from the source
    truncated to bf16); nothing written outside the tensors, nor to the one read."""
    gather = mode == GATHER
    written, read = (compact, dense) if gather else (dense, compact)
    tol = merge_tolerance(read.view.dtype, written.view.dtype, mode == ADD)
    sources = [read.before] + ([truncate_to_bf16(read.before)] if tol.truncated_src else [])
    candidates = [pytorch_result(mode, *((source, compact.before) if gather else (dense.before, source)),
                                 mask)[gather] for source in sources]
    assert_close_ulps(written.view, candidates, tol.ulps, "written tensor")
    assert_bits_equal(read.view, read.before, "read tensor")
    dense.assert_guard_intact()
    compact.assert_guard_intact()


def run(mode, mask, m, cfg, dense_dtype=torch.bfloat16, compact_dtype=torch.float32, lookback=4, h=H):
    """Merge with fresh guarded tensors (dense [N, h], compact [m, h]) and check against PyTorch."""
    dense = Guarded(mask.numel(), h, dense_dtype, seed=1)
    compact = Guarded(m, h, compact_dtype, seed=2)
    scan_copy.mask_scan_copy(dense.view, compact.view, mask.view(torch.uint8), mode, cfg, lookback=lookback)
    assert_like_pytorch(mode, dense, compact, mask)


def assert_state_ready(state: torch.Tensor, gen: int, high: int) -> None:
    """The workspace header as a launch leaves it: counters back at 0, GEN and HIGH as given."""
    assert state[TICKET.value].item() == 0 and state[DONE.value].item() == 0, "counters not reset"
    assert state[GEN.value].item() == gen and state[HIGH.value].item() == high


def masks(n: int) -> dict[str, torch.Tensor]:
    """Every mask layout the tests move: conftest's kinds, one middle row, scattered bytes of 2 and 255."""
    found = {kind: make_mask(kind, (n,), seed=3) for kind in ("empty", "full", "first", "last", "blocks",
                                                             "random10", "random50", "random90")}
    found["middle"] = torch.zeros(n, dtype=torch.bool)
    found["middle"][n // 2] = True
    raw = torch.zeros(n, dtype=torch.uint8)
    raw[1::3], raw[2::7] = 2, 255  # PyTorch reads any nonzero bool byte as True
    found["bytes_2_255"] = raw.view(torch.bool)
    return found


# (config, lookback): one row per program (the most tiles), a look-back of one word, tiles past the mask's end.
CONFIGS = [(KernelConfig(1, 16, num_warps=4), 1), (KernelConfig(4, 32, num_warps=4), 4),
           (KernelConfig(8, 64, num_warps=4), 32), (KernelConfig(2, 16, num_warps=4), 2)]
CONFIG_IDS = [f"rows{c.rows}-bh{c.block_h}-lookback{lookback}" for c, lookback in CONFIGS]


@pytest.mark.parametrize(("config", "lookback"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("kind", list(masks(N)))
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_moves_rows_as_pytorch(mode, kind, config, lookback):
    mask = masks(N)[kind]
    run(mode, mask, int((mask.view(torch.uint8) != 0).sum()), config, lookback=lookback)


@pytest.mark.parametrize("m_vs_k", ["m_below_k", "m_above_k", "m_one_k_zero"])
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_count_mismatch_moves_the_first_min_k_m_rows(mode, m_vs_k):
    mask = make_mask("empty" if m_vs_k == "m_one_k_zero" else "random50", (N,), seed=8)
    k = int(mask.sum())
    m = {"m_below_k": k - 5, "m_above_k": k + 6, "m_one_k_zero": 1}[m_vs_k]
    run(mode, mask, m, KernelConfig(4, 16, num_warps=4))


@pytest.mark.parametrize(("compact_dtype", "dense_dtype"), DTYPE_PAIRS, ids=DTYPE_PAIR_IDS)
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_casts_between_every_dtype_pair(mode, compact_dtype, dense_dtype):
    mask = make_mask("random50", (N,), seed=6)
    run(mode, mask, int(mask.sum()), KernelConfig(4, 32, num_warps=4), dense_dtype, compact_dtype)


def test_nothing_to_move_launches_nothing():
    state = scan_copy.workspace(CPU, 1)
    gen = state[GEN.value].item()
    for n, m, h in ((0, 3, 8), (5, 0, 8), (5, 3, 0)):
        dense, compact = torch.zeros(n, h), torch.ones(m, h)
        assert scan_copy.mask_scan_copy(dense, compact, torch.ones(n, dtype=torch.uint8), COPY,
                                        KernelConfig(4, 16)) is None
        assert not dense.any()
    assert state[GEN.value].item() == gen, "a launch ran"


def test_refuses_2_to_the_31_mask_rows_before_anything():
    dense = torch.zeros(1, 4).expand(2**31, 4)  # a stride-0 view: the rows are not allocated
    with pytest.raises(ValueError, match="dense has 2147483648 rows"):
        scan_copy.mask_scan_copy(dense, torch.ones(2, 4), torch.ones(1, dtype=torch.uint8).expand(2**31), COPY,
                                 KernelConfig(4, 16))


@pytest.fixture
def fresh_workspaces(monkeypatch):
    """No workspace from earlier tests: the first launch below makes the CPU one, of 16 tiles at least."""
    monkeypatch.setattr(scan_copy, "_eager", {})
    monkeypatch.setattr(scan_copy, "_MIN_TILES", 16)


def test_back_to_back_launches_leave_the_workspace_ready(fresh_workspaces):
    """Five merges in a row with different masks and sizes: each right, and each leaves the counters at 0,
    GEN + 1 and HIGH the most tiles so far; the third needs more tiles than the first workspace has (16), so
    it gets a new (zeroed) one."""
    cfg = KernelConfig(1, 16, num_warps=4)
    gen = high = 0
    state = None
    for step, n in enumerate((12, 5, 40, 3, 30)):
        mask = make_mask(("random50", "blocks", "random10", "full", "random90")[step], (n,), seed=step)
        run(COPY if step % 2 == 0 else ADD, mask, int(mask.sum()), cfg, h=8)
        now = scan_copy.workspace(CPU, 1)
        if now is not state:
            assert step in (0, 2), f"workspace replaced at step {step}"
            state, gen, high = now, 0, 0
        gen, high = gen + 1, max(high, n)
        assert_state_ready(state, gen, high)
        assert (state[STATUS.value : STATUS.value + n] >> 32).eq(gen).all(), "status words' tags"


def test_tags_wrap_after_the_status_words_are_zeroed(fresh_workspaces):
    """The launch with the last tag of a period zeroes every status word ever written (below HIGH), so the
    tags can start over; the launch before it leaves them."""
    cfg = KernelConfig(2, 16, num_warps=4)
    state = scan_copy.workspace(CPU, 64)
    period = TAG_PERIOD.value
    state[GEN.value] = 5 * period - 2  # two launches before the wrap
    state[HIGH.value] = 60
    state[STATUS.value : STATUS.value + 60] = 12345  # words an earlier, larger launch left
    mask = make_mask("random50", (N,), seed=2)
    tiles = -(-N // cfg.rows)
    for step in range(3):
        run(COPY, mask, int(mask.sum()), cfg)
        assert_state_ready(state, 5 * period - 1 + step, 60)
        words = state[STATUS.value : STATUS.value + 60]
        if step == 0:  # tag period - 1: written, the older words kept
            assert (words[:tiles] >> 32).eq(period - 1).all() and words[tiles:].eq(12345).all()
        elif step == 1:  # the last tag: every word zeroed
            assert words.eq(0).all()
        else:  # the first tag again
            assert (words[:tiles] >> 32).eq(1).all() and words[tiles:].eq(0).all()


def plant(state: torch.Tensor, tag: int, words: dict[int, tuple[bool, int]]) -> None:
    """Status words of ``tag`` for tiles: {tile: (inclusive, value)}."""
    for tile, (inclusive, value) in words.items():
        state[STATUS.value + tile] = (tag << 32) | (value << 1) | inclusive


@pytest.mark.parametrize("lookback", [1, 2, 4, 32])
@pytest.mark.parametrize("reach", ["inclusive_far_back", "tile_zero", "inclusive_next_door"])
def test_look_back_sums_aggregates_to_the_nearest_inclusive_prefix(reach, lookback):
    """One program takes tile t (the ticket set to t) and finds its predecessors' words planted: aggregates
    back to an inclusive prefix at tile p (windows of ``lookback`` words, several for a far p), and below p
    aggregates of wrong values, which must not be read. Its rows must land where the whole mask puts them."""
    rows, t = 2, 21
    n = (t + 1) * rows
    mask = make_mask("random50", (n,), seed=11)
    counts = mask.view(-1, rows).sum(1).tolist()
    p = {"inclusive_far_back": 6, "tile_zero": 0, "inclusive_next_door": t - 1}[reach]
    state = torch.zeros(STATUS.value + t + 1, dtype=torch.int64)
    state[TICKET.value] = t
    tag = 7
    state[GEN.value] = tag - 1
    planted = {tile: (False, counts[tile]) for tile in range(p + 1, t)}
    planted[p] = (True, sum(counts[: p + 1]))
    planted.update({tile: (False, 999) for tile in range(p)})
    plant(state, tag, planted)
    dense = Guarded(n, 8, torch.float32, seed=1)
    compact = Guarded(int(mask.sum()), 8, torch.float32, seed=2)
    mask_scan_copy_kernel[(1,)](dense.view, compact.view, mask.view(torch.uint8), state, n, compact.view.shape[0],
                                8, dense.view.stride(0), compact.view.stride(0), MODE=COPY, ROWS=rows, BLOCK_H=8,
                                LOOKBACK=lookback)
    in_tile = torch.zeros(n, dtype=torch.bool)
    in_tile[t * rows :] = True
    expected = dense.before.clone()
    expected[mask & in_tile] = compact.before[sum(counts[:t]) :]
    assert_bits_equal(dense.view, expected, "dense")
    assert state[STATUS.value + t].item() == (tag << 32) | (sum(counts) << 1) | 1, "tile t's inclusive prefix"


def test_captured_launches_carve_the_reserve_apart(monkeypatch):
    """Each captured launch gets its own zeroed workspace: 128-byte aligned slices of the device's reserve
    while they fit, then a buffer of its own; all kept, and the reserve marked for a refill."""
    reserve = torch.zeros(100, dtype=torch.int64)
    monkeypatch.setattr(scan_copy, "_reserve", {None: [reserve, 0]})  # a CPU tensor's device index is None
    monkeypatch.setattr(scan_copy, "_captured", [])
    monkeypatch.setattr(scan_copy, "_drawn", set())
    first, second, third = (scan_copy._for_capture(CPU, 40) for _ in range(3))
    assert first.data_ptr() == reserve.data_ptr() and first.numel() == 40
    assert second.data_ptr() == reserve.data_ptr() + 48 * 8 and second.numel() == 40
    assert third.untyped_storage().data_ptr() != reserve.untyped_storage().data_ptr() and not third.any()
    assert [id(t) for t in scan_copy._captured] == [id(first), id(second), id(third)]
    assert scan_copy._drawn == {None}
