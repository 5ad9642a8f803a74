"""The Triton kernels called directly (under the interpreter on the CPU): row_copy in its four modes,
mask_row_copy, the device row map, mask_select_copy, and merge_triton with explicit kernel configurations.

Tensors sit inside larger guard buffers (extra rows above and below, extra columns on both sides), so a
read or write out of bounds shows up as a changed guard or as a wrong value in a row that must not move.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mmmerge_triton as mm
from mmmerge_triton import executor, scatter
from mmmerge_triton.scatter import ADD, COPY, GATHER
from mmmerge_triton.kernel_config import KernelConfig

from .conftest import DTYPE_PAIR_IDS, DTYPE_PAIRS, assert_bits_equal, assert_merged, make_mask, randn

pytestmark = pytest.mark.skipif(not scatter.supports(torch.device("cpu")), reason="needs TRITON_INTERPRET=1")

MODES = {"copy": COPY, "add": ADD, "gather": GATHER}
CONFIGS = [KernelConfig(rows, block_h, num_warps=4) for rows in (1, 2, 16) for block_h in (32, 64, 256)]
CONFIG_IDS = [f"rows{c.rows}-bh{c.block_h}" for c in CONFIGS]
N, H = 41, 123  # H: a tail for block_h 32 and 64, a single partial tile for 256


class Guarded:
    """A [rows, cols] view, row-strided, inside a random buffer with GUARD rows above and below it."""

    GUARD = 3

    def __init__(self, rows, cols, dtype, seed):
        g = self.GUARD
        self.buffer = randn(rows + 2 * g, cols + 4, dtype=dtype, seed=seed)
        self.view = self.buffer[g : g + rows, 2 : cols + 2]
        self.before = self.view.clone()
        self._buffer_before = self.buffer.clone()
        self._outside = torch.ones(self.buffer.shape, dtype=torch.bool)
        self._outside[g : g + rows, 2 : cols + 2] = False

    def assert_guard_intact(self):
        assert_bits_equal(self.buffer[self._outside], self._buffer_before[self._outside], "guard around the view")


def moved_mask(true_rows, n, moved):
    """The mask of the first ``moved`` of ``true_rows`` (the rows a map of them moves)."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.as_tensor(true_rows[:moved], dtype=torch.long)] = True
    return mask


def assert_rows_moved(mode, dense, compact, true_rows, moved):
    """dense and compact after a kernel that moved the first ``moved`` rows of the map ``true_rows``."""
    n = dense.view.shape[0]
    mask = moved_mask(true_rows, n, moved)
    if mode in (COPY, ADD):
        assert_merged(dense.view, dense.before, mask, compact.before[:moved], mode == ADD, "triton")
    else:  # GATHER: compact[j] = dense[true_rows[j]] for j < moved, compact rows past that untouched
        assert_bits_equal(dense.view, dense.before, "dense (read only)")
        first = torch.arange(compact.view.shape[0]) < moved
        picked = torch.stack([dense.before[i] for i in true_rows[:moved]]) if moved else dense.before[:0]
        assert_merged(compact.view, compact.before, first, picked, False, "triton")
    if mode != GATHER:
        assert_bits_equal(compact.view, compact.before, "compact (read only)")
    dense.assert_guard_intact()
    compact.assert_guard_intact()


# ---- row_copy ---------------------------------------------------------------------------------------------

def row_map_case(case: str, mask: torch.Tensor):
    """(rows int32 tensor, count tensor or None, M) for a mask with K true rows.

    no_count: M = K, every entry valid. count_below_m: M > K, the map holds K valid entries then decoys
    (rows that must not move) up to M. count_above_m: M < K, the map holds all K entries.
    """
    true_rows = np.flatnonzero(mask.numpy())
    k = true_rows.size
    if case == "no_count":
        return torch.from_numpy(true_rows.astype(np.int32)), None, k
    count = torch.tensor([k], dtype=torch.int32)
    if case == "count_below_m":
        decoys = np.flatnonzero(~mask.numpy())[:5]
        return torch.from_numpy(np.concatenate([true_rows, decoys]).astype(np.int32)), count, k + decoys.size
    if case == "count_above_m":
        return torch.from_numpy(true_rows.astype(np.int32)), count, k - 4
    raise ValueError(case)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("case", ["no_count", "count_below_m", "count_above_m"])
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_row_copy_moves_the_first_min_count_m_rows(mode, case, config):
    mask = make_mask("random50", (N,), seed=4)
    rows, count, m = row_map_case(case, mask)
    dense = Guarded(N, H, torch.float16, seed=1)
    compact = Guarded(m, H, torch.bfloat16, seed=2)
    scatter.row_copy(dense.view, compact.view, rows, count, mode, config)
    k = int(mask.sum())
    assert_rows_moved(mode, dense, compact, np.flatnonzero(mask.numpy()), min(k, m))


@pytest.mark.parametrize(("compact_dtype", "dense_dtype"), DTYPE_PAIRS, ids=DTYPE_PAIR_IDS)
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_row_copy_casts_between_every_dtype_pair(mode, compact_dtype, dense_dtype):
    mask = make_mask("random50", (N,), seed=6)
    rows, count, m = row_map_case("no_count", mask)
    dense = Guarded(N, H, dense_dtype, seed=1)
    compact = Guarded(m, H, compact_dtype, seed=2)
    scatter.row_copy(dense.view, compact.view, rows, count, mode, KernelConfig(2, 64))
    assert_rows_moved(mode, dense, compact, rows.tolist(), m)


def test_row_copy_with_zero_count_moves_nothing():
    mask = make_mask("random50", (N,))
    rows, _, m = row_map_case("no_count", mask)
    dense, compact = Guarded(N, H, torch.float32, 1), Guarded(m, H, torch.float32, 2)
    scatter.row_copy(dense.view, compact.view, rows, torch.zeros(1, dtype=torch.int32), COPY, KernelConfig(2, 64))
    assert_rows_moved(COPY, dense, compact, rows.tolist(), 0)


@pytest.mark.parametrize("config", CONFIGS[::4], ids=CONFIG_IDS[::4])
def test_gather_rows_helper(config):
    mask = make_mask("blocks", (N,))
    rows, count, m = row_map_case("count_below_m", mask)
    k = int(mask.sum())
    dense = randn(N, H, dtype=torch.bfloat16)
    gathered = scatter.gather_rows(dense, rows, count, m, torch.float32, config)
    assert_bits_equal(gathered[:k], dense[mask].float(), "gathered rows")
    assert_bits_equal(gathered[k:], torch.zeros(m - k, H), "rows past the count (zero)")


# ---- mask_row_copy ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("m_vs_k", ["m_equals_k", "m_below_k", "m_above_k"])
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_mask_row_copy_moves_the_first_min_k_m_true_rows(mode, m_vs_k, config):
    mask = make_mask("random50", (N,), seed=8)
    k = int(mask.sum())
    m = {"m_equals_k": k, "m_below_k": k - 5, "m_above_k": k + 6}[m_vs_k]
    dense = Guarded(N, H, torch.bfloat16, seed=1)
    compact = Guarded(m, H, torch.float32, seed=2)
    scatter.mask_row_copy(dense.view, compact.view, mask.view(torch.uint8), mode, config)
    assert_rows_moved(mode, dense, compact, np.flatnonzero(mask.numpy()), min(k, m))


@pytest.mark.parametrize("mode", [COPY, GATHER], ids=["copy", "gather"])
def test_mask_row_copy_counts_a_prefix_longer_than_one_chunk(mode):
    n = scatter.PREFIX_CHUNK + 905  # programs past the first chunk sum a multi-step prefix
    mask = make_mask("random50", (n,), seed=9)
    k = int(mask.sum())
    dense = Guarded(n, 8, torch.float32, seed=1)
    compact = Guarded(k - 3, 8, torch.float32, seed=2)
    scatter.mask_row_copy(dense.view, compact.view, mask.view(torch.uint8), mode, KernelConfig(16, 8))
    assert_rows_moved(mode, dense, compact, np.flatnonzero(mask.numpy()), k - 3)


# ---- the device row map -----------------------------------------------------------------------------------

@pytest.mark.parametrize("capacity_vs_k", ["equal", "smaller", "larger"])
@pytest.mark.parametrize("n", [1, 33, 1025, scatter.PREFIX_CHUNK + 905, scatter.SCAN_PREFIX_CHUNK + 2 * 1024 + 905])
def test_device_rows_builds_the_row_map_and_count(n, capacity_vs_k):
    mask = make_mask("random50", (n,), seed=n) if n > 1 else torch.ones(1, dtype=torch.bool)
    true_rows = np.flatnonzero(mask.numpy())
    k = true_rows.size
    capacity = {"equal": k, "smaller": k // 2, "larger": k + 7}[capacity_vs_k]
    rows, count = scatter.device_rows(mask, capacity)
    assert rows.dtype == torch.int32 and count.dtype == torch.int32
    assert count.tolist() == [k]
    kept = min(k, capacity)
    assert rows[:kept].tolist() == true_rows[:kept].tolist()


@pytest.mark.parametrize("n", [40, 3 * 1024 + 5])
def test_mask_to_rows_drops_entries_past_capacity(n):
    mask = make_mask("random90", (n,), seed=1)
    k = int(mask.sum())
    capacity = k // 3
    rows = torch.full((k + 8,), -7, dtype=torch.int32)
    count = torch.full((1,), -7, dtype=torch.int32)
    scatter.mask_to_rows(mask.view(torch.uint8), rows, count, capacity)
    assert count.item() == k
    assert rows[:capacity].tolist() == np.flatnonzero(mask.numpy())[:capacity].tolist()
    assert rows[capacity:].eq(-7).all(), "wrote past capacity"


def test_device_rows_of_empty_and_all_false_masks():
    rows, count = scatter.device_rows(torch.zeros(0, dtype=torch.bool), 0)
    assert count.tolist() == [0]
    rows, count = scatter.device_rows(torch.zeros(50, dtype=torch.bool), 4)
    assert count.tolist() == [0]


def test_device_rows_of_a_2d_mask_uses_flat_row_indices():
    mask = make_mask("random50", (4, 9), seed=2)
    rows, count = scatter.device_rows(mask, int(mask.sum()))
    assert rows.tolist() == np.flatnonzero(mask.numpy()).tolist()


# ---- bool bytes other than 0 and 1 ---------------------------------------------------------------------------

def odd_bytes_mask(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a bool mask whose true bytes are 1, 2, 7 or 255 — as uint8_tensor.view(torch.bool) gives —, the same
    mask with 0/1 bytes). PyTorch reads any nonzero byte as True."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.tensor([0, 1, 2, 7, 255], dtype=torch.uint8)[torch.randint(0, 5, (n,), generator=g)]
    return raw.view(torch.bool), raw != 0


@pytest.mark.parametrize("n", [37, scatter.PREFIX_CHUNK + 905, scatter.SCAN_PREFIX_CHUNK + 2 * 1024 + 905])
def test_mask_kernels_read_any_nonzero_byte_as_true(n):
    odd, clean = odd_bytes_mask(n, seed=n)
    true_rows = np.flatnonzero(clean.numpy())
    k = true_rows.size
    assert int(odd.view(torch.uint8).sum()) > k, "the mask must hold bytes above 1"
    rows, count = scatter.device_rows(odd, k)
    assert count.tolist() == [k]
    assert rows[:k].tolist() == true_rows.tolist()
    dense = Guarded(n, 8, torch.float32, seed=1)
    compact = Guarded(k, 8, torch.float32, seed=2)
    scatter.mask_row_copy(dense.view, compact.view, odd.view(torch.uint8), COPY, KernelConfig(16, 8))
    assert_rows_moved(COPY, dense, compact, true_rows, k)


def single_bit_bytes_mask(n: int, offset: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(a bool mask [n] at ``offset`` bytes into a larger buffer, whose true bytes each hold one of the eight
    single bits or 255 — each bit of a word's byte must count its byte once —, the indices of its true rows)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([0, 0, 0, 1, 2, 4, 8, 16, 32, 64, 128, 255], dtype=torch.uint8)
    buffer = torch.zeros(n + 8, dtype=torch.uint8)
    buffer[offset:offset + n] = values[torch.randint(0, values.numel(), (n,), generator=g)]
    raw = buffer[offset:offset + n]
    return raw.view(torch.bool), np.flatnonzero(raw.numpy())


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4], ids=lambda o: f"at_byte_{o}")
def test_the_prefix_count_reads_words_or_bytes_by_the_masks_address(offset, monkeypatch):
    """count_true_before reads a 4-byte-aligned mask as words (scatter.words) and any other by bytes: the row map
    and the one-launch copy agree with the true rows at every address, over many steps of the prefix count (its
    chunks cut to 64 bytes here, so that the interpreter runs few programs), and for one-launch programs of 1, 2
    and 8 rows, whose prefixes end off a word (the last bytes counted one by one). tests/gpu/test_exact.py runs
    the shipped chunks."""
    monkeypatch.setattr(scatter, "SCAN_PREFIX_CHUNK", 64)
    monkeypatch.setattr(scatter, "PREFIX_CHUNK", 64)
    n = 4 * 1024 + 905  # five scan programs of 1024 bytes; the last counts its prefix in 32 steps of 2 x 64
    mask, true_rows = single_bit_bytes_mask(n, offset, seed=offset)
    assert scatter.words(mask.data_ptr() % 16) == (offset % 4 == 0)
    k = true_rows.size
    rows, count = scatter.device_rows(mask, k)
    assert count.tolist() == [k]
    assert rows[:k].tolist() == true_rows.tolist()
    n_fused = 3 * 64 + 13
    mask, true_rows = single_bit_bytes_mask(n_fused, offset, seed=offset + 10)
    k = true_rows.size
    for rows_per_program in (1, 2, 8):
        dense = Guarded(n_fused, 4, torch.float32, seed=1)
        compact = Guarded(k, 4, torch.float32, seed=2)
        config = KernelConfig(rows_per_program, 4)
        scatter.mask_row_copy(dense.view, compact.view, mask.view(torch.uint8), COPY, config)
        assert_rows_moved(COPY, dense, compact, true_rows, k)




def test_the_one_launch_kernel_refuses_masks_it_cannot_index():
    """mask_row_copy's prefix count indexes up to N + PREFIX_CHUNK mask bytes in int32: past 2**31 - 1 -
    PREFIX_CHUNK rows it raises, before any launch (the dispatcher never picks it there; an explicit
    configuration can)."""
    n = scatter.MAX_ROWS - scatter.PREFIX_CHUNK + 1
    dense = torch.zeros(1, 4).expand(n, 4)  # no memory behind the rows: nothing may be launched
    mask = torch.zeros(1, dtype=torch.uint8).expand(n)
    with pytest.raises(ValueError, match="one-launch kernel takes at most"):
        scatter.mask_row_copy(dense, torch.zeros(2, 4), mask, COPY, KernelConfig(8, 4, 4, 1, True))

@pytest.mark.parametrize("tile", [256, 1024], ids=lambda t: f"tile_{t}")
@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda o: f"at_byte_{o}")
def test_the_counted_scan_sums_its_block_counts(offset, tile, monkeypatch):
    """The two-level scan (scatter.counted): each block's true bytes counted by one launch, then each program's
    prefix summed from the counts before its block, COUNTS_CHUNK at a time (cut to 4 here: 11 programs take up to
    three steps), its block's cumsum taken ``tile`` bytes at a time; any nonzero byte true, at any address;
    entries past capacity dropped, nothing written past the counts."""
    monkeypatch.setattr(scatter, "COUNTED_FROM", 1)
    monkeypatch.setattr(scatter, "COUNTS_CHUNK", 4)
    monkeypatch.setattr(scatter, "SCAN_TILE", tile)
    n = 10 * 1024 + 905
    mask, true_rows = single_bit_bytes_mask(n, offset, seed=offset + 20)
    k = true_rows.size
    for block in (1024, 2048):
        programs = -(-n // block)
        for capacity in (k, k // 3):
            rows = torch.full((k + 8,), -7, dtype=torch.int32)
            count = torch.full((1,), -7, dtype=torch.int32)
            counts = torch.full((programs + 4,), -7, dtype=torch.int32)
            scatter.mask_to_rows(mask.view(torch.uint8), rows, count, capacity, block=block, counts=counts)
            assert count.tolist() == [k]
            assert rows[:capacity].tolist() == true_rows[:capacity].tolist()
            assert rows[capacity:].eq(-7).all(), "wrote past capacity"
            per_block = np.bincount(true_rows // block, minlength=programs)
            assert counts[:programs].tolist() == per_block.tolist()
            assert counts[programs:].eq(-7).all(), "wrote past the block counts"


@pytest.mark.parametrize("n", [1, 1000, 32768, scatter.COUNTED_FROM - 1, scatter.COUNTED_FROM, 2**20, 2**20 + 1,
                               2**31 - 1])
def test_the_scan_block_fits_the_kernels(n):
    """Blocks are powers of two from 1024, a whole number of cumsum steps; a counted scan runs at most
    COUNTED_PROGRAMS programs, a one-launch scan's block stays within one step; and a dispatch bucket
    (dispatch.bucket: an executor Launch keeps its first call's block and kind) falls on one side of
    COUNTED_FROM."""
    from mmmerge_triton.dispatch import bucket
    block = scatter.scan_block(n)
    assert block >= 1024 and block & (block - 1) == 0
    assert block % min(block, scatter.SCAN_TILE) == 0
    if scatter.counted(n):
        assert -(-n // block) <= scatter.COUNTED_PROGRAMS
    else:
        assert block <= scatter.SCAN_TILE
    assert scatter.counted(bucket(n)) == scatter.counted(n)


# ---- mask_select_copy: no row map ---------------------------------------------------------------------------

@pytest.fixture
def small_select_blocks(monkeypatch):
    """Blocks of 16 mask bytes, up to 64 of them: the interpreter runs many blocks in few rows."""
    monkeypatch.setattr(scatter, "SELECT_BLOCK", 16)
    monkeypatch.setattr(scatter, "SELECT_COUNTS", 64)
    monkeypatch.setattr(scatter, "SELECT_BELOW", 16 * 64)


SELECT_CASES = [(offset, mode, m_vs_k, KernelConfig(4, 16), 40 * 16 + 13) for offset in (0, 1, 3)
                for mode in (COPY, ADD) for m_vs_k in ("m_equals_k", "m_below_k", "m_above_k")]
SELECT_CASES += [(1, COPY, "m_below_k", KernelConfig(1, 16), 653), (3, ADD, "m_above_k", KernelConfig(2, 64), 653)]
SELECT_CASES += [(0, COPY, "m_equals_k", KernelConfig(4, 16), 511), (3, ADD, "m_above_k", KernelConfig(1, 16), 511),
                 (1, COPY, "m_below_k", KernelConfig(2, 64), 511)]


@pytest.mark.parametrize(("offset", "mode", "m_vs_k", "config", "n"), SELECT_CASES,
                         ids=[f"at_byte_{o}-{'add' if d == ADD else 'copy'}-{mk}-rows{c.rows}-bh{c.block_h}-n{n}"
                              for o, d, mk, c, n in SELECT_CASES])
def test_mask_select_copy_moves_the_first_min_k_m_true_rows(offset, mode, m_vs_k, config, n, small_select_blocks):
    """Each program finds the dense row of its j-th true byte from the block counts and one block's bytes: over
    41 blocks (the last one partial) summed 64 at a time (select_sums), or 32 blocks summed 32 at a time (every
    count a program sums is a block's), a mask of single-bit and 255 bytes at any address, M equal to, below and
    above its true rows, H = 37 (column tails past the first BLOCK_H read, and a BLOCK_H wider than H); nothing
    written past the counts, the views or the rows that move."""
    assert scatter.select_sums(n) == {653: 64, 511: 32}[n]
    mask, true_rows = single_bit_bytes_mask(n, offset, seed=offset + 30)
    k = true_rows.size
    m = {"m_equals_k": k, "m_below_k": k - 70, "m_above_k": k + 9}[m_vs_k]
    dense = Guarded(n, 37, torch.bfloat16, seed=1)
    compact = Guarded(m, 37, torch.float32, seed=2)
    programs = -(-n // 16)
    counts = torch.full((programs + 4,), -7, dtype=torch.int32)
    scatter.mask_select_copy(dense.view, compact.view, mask.view(torch.uint8), counts, mode, config)
    assert_rows_moved(mode, dense, compact, true_rows, min(k, m))
    assert counts[:programs].tolist() == np.bincount(true_rows // 16, minlength=programs).tolist()
    assert counts[programs:].eq(-7).all(), "wrote past the block counts"


@pytest.mark.parametrize("pattern", ["all_true", "all_false", "last_row_only", "first_block_empty"])
def test_mask_select_copy_edge_masks(pattern, small_select_blocks):
    n = 5 * 16 + 1
    mask = torch.zeros(n, dtype=torch.bool)
    if pattern == "all_true":
        mask[:] = True
    elif pattern == "last_row_only":
        mask[-1] = True
    elif pattern == "first_block_empty":
        mask[16::3] = True
    true_rows = np.flatnonzero(mask.numpy())
    k = true_rows.size
    dense = Guarded(n, 5, torch.float16, seed=3)
    compact = Guarded(max(k, 2), 5, torch.float16, seed=4)
    counts = torch.empty(-(-n // 16), dtype=torch.int32)
    scatter.mask_select_copy(dense.view, compact.view, mask.view(torch.uint8), counts, COPY, KernelConfig(2, 4))
    assert_rows_moved(COPY, dense, compact, true_rows, min(k, max(k, 2)))


def test_mask_select_copy_with_the_shipped_blocks():
    """SELECT_BLOCK and SELECT_COUNTS as shipped: three blocks and a partial fourth."""
    n = 3 * scatter.SELECT_BLOCK + 5
    odd, clean = odd_bytes_mask(n, seed=40)
    true_rows = np.flatnonzero(clean.numpy())
    k = true_rows.size
    dense = Guarded(n, 8, torch.float32, seed=1)
    compact = Guarded(k, 8, torch.bfloat16, seed=2)
    counts = torch.empty(4, dtype=torch.int32)
    scatter.mask_select_copy(dense.view, compact.view, odd.view(torch.uint8), counts, ADD, KernelConfig(16, 8))
    assert_rows_moved(ADD, dense, compact, true_rows, k)


def test_mask_select_copy_refusals_and_empty_inputs():
    counts = torch.empty(1, dtype=torch.int32)
    mask = torch.ones(4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="copies or adds"):
        scatter.mask_select_copy(torch.zeros(4, 2), torch.zeros(4, 2), mask, counts, GATHER, KernelConfig(1, 2))
    n = scatter.SELECT_COUNTS * scatter.SELECT_BLOCK + 1  # one block count more than a program sums
    big = torch.zeros(1, 2).expand(n, 2)  # no memory behind the rows: nothing may be launched
    with pytest.raises(ValueError, match="up to"):
        scatter.mask_select_copy(big, torch.zeros(2, 2), torch.zeros(1, dtype=torch.uint8).expand(n), counts, COPY,
                                 KernelConfig(1, 2))
    dense = torch.zeros(4, 2)
    assert scatter.mask_select_copy(dense, torch.zeros(0, 2), mask, counts, COPY, KernelConfig(1, 2)) is None
    assert scatter.mask_select_copy(torch.zeros(0, 2), torch.ones(3, 2), mask[:0], counts, COPY,
                                    KernelConfig(1, 2)) is None
    assert dense.eq(0).all()


@pytest.mark.parametrize("n", [1, 1000, 1024, 1025, 16383, 16384, 20000, scatter.SELECT_BELOW - 1,
                               scatter.SELECT_BELOW, 2**31 - 1])
def test_the_select_threshold_and_width_fit_the_kernel(n):
    """A dispatch bucket falls on one side of SELECT_BELOW (an executor Launch keeps its first call's route) and
    has one select_sums (its bound copy's compiled width), a power of two that holds every block count of an N
    under SELECT_BELOW."""
    from mmmerge_triton.dispatch import bucket
    sums = scatter.select_sums(n)
    assert sums & (sums - 1) == 0 and 16 <= sums <= scatter.SELECT_COUNTS
    if scatter.selects(n):
        assert -(-n // scatter.SELECT_BLOCK) <= sums
    assert scatter.selects(bucket(n)) == scatter.selects(n)
    assert scatter.select_sums(bucket(n)) == sums


# ---- merge_triton with explicit configurations and row maps ----------------------------------------------

@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize(("src_dtype", "dst_dtype"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
                                                      (torch.float16, torch.float32)], ids=["fp32->bf16", "bf16->fp16", "fp16->fp32"])
def test_merge_triton_with_kernel_config(src_dtype, dst_dtype, config, accumulate):
    mask = make_mask("random50", (3, 13), seed=3)  # 3-D dst: the rows of [3, 13, H] flattened
    dst = randn(3, 13, H, dtype=dst_dtype)
    src = randn(int(mask.sum()), H, dtype=src_dtype, seed=1)
    assert src.shape[0] % 2 == 1
    out = dst.clone()
    executor.merge_triton(out, mask, src, accumulate, rowmap=None, config=config)
    assert_merged(out, dst, mask, src, accumulate, "triton")


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("m_vs_k", ["m_equals_k", "m_below_k", "m_above_k"])
def test_merge_triton_with_device_row_map_tolerates_count_mismatch(m_vs_k, accumulate):
    """A device row map has no host check: the first min(K, M) true rows take src rows 0..min-1, later
    true rows keep their values, later src rows are unused."""
    mask = make_mask("random50", (N,), seed=5)
    k = int(mask.sum())
    m = {"m_equals_k": k, "m_below_k": k - 4, "m_above_k": k + 4}[m_vs_k]
    dst = Guarded(N, H, torch.float32, seed=1)
    src = Guarded(m, H, torch.float16, seed=2)
    row_map = scatter.device_rows(mask, m)
    executor.merge_triton(dst.view, mask, src.view, accumulate, rowmap=row_map, config=KernelConfig(2, 32))
    assert_rows_moved(ADD if accumulate else COPY, dst, src, np.flatnonzero(mask.numpy()), min(k, m))


def test_merge_triton_count_mismatch_with_cpu_mask_raises_before_writing():
    mask = make_mask("random50", (N,))
    dst = randn(N, H)
    before = dst.clone()
    with pytest.raises(ValueError, match="multimodal tokens to"):
        executor.merge_triton(dst, mask, randn(int(mask.sum()) + 1, H), False, config=KernelConfig(2, 32))
    assert_bits_equal(dst, before)


def test_merge_triton_rejects_a_destination_without_a_row_view():
    mask = make_mask("random50", (3, 5))
    dst = randn(5, 3, H).transpose(0, 1)  # [3, 5, H] whose leading dims do not flatten to a view
    before = dst.clone()
    with pytest.raises(ValueError, match="path='triton' cannot merge.*leading dims must flatten to rows"):
        mm.masked_row_scatter_(dst, mask, randn(int(mask.sum()), H), path="triton")
    assert_bits_equal(dst, before)


# ---- copy_words (staged tables into device memory) -----------------------------------------------------------

@pytest.mark.parametrize("words", [1, 1023, 1024, 3000])
def test_copy_words_copies_exactly_n_words(words):
    from mmmerge_triton.kernels.copy_words import copy_words_kernel

    src = torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32)
    dst = torch.full((words + 5,), 7, dtype=torch.int32)
    copy_words_kernel[(-(-words // 1024),)](src, dst, words, BLOCK=1024)
    assert torch.equal(dst[:words], src) and dst[words:].eq(7).all()
