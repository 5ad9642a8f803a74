"""mask_scan_copy on the GPU: PyTorch's result bit for bit from N = 1 to 2**20 (many tiles, so programs
really wait in the look-back), the workspace left ready by every launch (200 in a row), one workspace per
stream (two streams at once), CUDA graphs (replayed with new mask contents, next to eager calls and other
graphs on other streams), no host sync, and N*H past 2**31."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

from mmmerge_triton import scan_copy  # noqa: E402
from mmmerge_triton.kernel_config import KernelConfig  # noqa: E402
from mmmerge_triton.kernels.mask_scan_copy import DONE, GEN, TICKET  # noqa: E402
from mmmerge_triton.scatter import ADD, COPY, GATHER  # noqa: E402

from gpu_helpers import (DTYPE_PAIRS, assert_same, capture, dev, first_true, pair_id, rand, reference,  # noqa: E402
                         sync_debug_error)

DEV = dev()
H = 64
MODES = {"copy": COPY, "add": ADD, "gather": GATHER}


def cfg(rows: int, block_h: int = H) -> KernelConfig:
    return KernelConfig(rows, block_h, 8, 1)


def make_mask(n: int, kind: str, seed: int = 0) -> torch.Tensor:
    """A bool mask [n] on the GPU: "randomP" (P% of rows, seeded), "blocks" (two runs, one at the end),
    "bytes" (bytes of 2 and 255 viewed as bool: PyTorch reads them as True)."""
    if kind.startswith("random"):
        g = torch.Generator(device=DEV).manual_seed(seed)
        return torch.rand(n, generator=g, device=DEV) < int(kind[6:]) / 100
    if kind == "blocks":
        mask = torch.zeros(n, dtype=torch.bool, device=DEV)
        mask[n // 5 : n // 2] = True
        mask[n - n // 4 :] = True
        return mask
    raw = torch.zeros(n, dtype=torch.uint8, device=DEV)
    raw[1::3], raw[2::7] = 2, 255
    return raw.view(torch.bool)


def true_rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) != 0


def expected(mode: int, dense: torch.Tensor, compact: torch.Tensor, mask: torch.Tensor):
    """(dense, compact) as PyTorch leaves them: the first j = min(K, M) true rows take (or give) compact[:j]."""
    truth = true_rows(mask)
    j = min(int(truth.sum()), compact.shape[0])
    moved = first_true(truth, j)
    if mode == GATHER:
        out = compact.clone()
        out[:j] = dense[moved].to(compact.dtype)
        return dense, out
    return reference(dense, moved, compact[:j], mode == ADD), compact


def run_and_check(mode, mask, m, config, dense_dtype=torch.bfloat16, compact_dtype=torch.float32, seed=0,
                  lookback=scan_copy.LOOKBACK, h=H):
    n = mask.numel()
    dense = rand((n, h), dense_dtype, seed=seed)
    compact = rand((m, h), compact_dtype, seed=seed + 1)
    want = expected(mode, dense, compact, mask)
    scan_copy.mask_scan_copy(dense, compact, mask.view(torch.uint8), mode, config, lookback=lookback)
    torch.cuda.synchronize()
    assert_same(dense, want[0], "dense")
    assert_same(compact, want[1], "compact")


def header() -> list[int]:
    """TICKET, DONE and GEN of the current stream's workspace."""
    state = scan_copy.workspace(DEV, 1)
    torch.cuda.synchronize()
    return [state[TICKET.value].item(), state[DONE.value].item(), state[GEN.value].item()]


SIZES = [1, 2, 31, 1000, 16383, 16384, 16385, 65537, 262144, 1_000_003, 2**20]


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("kind", ["random50", "random5", "blocks"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_exact_from_1_to_2_to_the_20_rows(mode, n, kind, rows):
    mask = make_mask(n, kind, seed=n)
    run_and_check(mode, mask, int(true_rows(mask).sum()), cfg(rows), seed=n)


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_every_dtype_pair(mode, pair):
    src_dtype, dst_dtype = pair
    mask = make_mask(20000, "random50", seed=3)
    run_and_check(mode, mask, int(mask.sum()), cfg(8, 32), dst_dtype, src_dtype, h=H + 5)  # a column tail


@pytest.mark.parametrize("kind", ["bytes", "random90"])
@pytest.mark.parametrize("m_vs_k", ["m_below_k", "m_above_k"])
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_count_mismatch_moves_the_first_min_k_m_rows(mode, m_vs_k, kind):
    mask = make_mask(100_003, kind, seed=4)
    k = int(true_rows(mask).sum())
    run_and_check(mode, mask, k - 777 if m_vs_k == "m_below_k" else k + 999, cfg(4))


@pytest.mark.parametrize("lookback", [1, 4, 32, 128])
@pytest.mark.parametrize("kind", ["random50", "blocks"])
def test_a_million_one_row_tiles(kind, lookback):
    """2**20 programs of one row each: most look-backs find predecessors still running and wait on them. The
    launch leaves its workspace's counters at 0 and GEN one further."""
    mask = make_mask(2**20, kind, seed=5)
    scan_copy.workspace(DEV, 2**20)  # large enough already: the launch below keeps it
    before = header()
    run_and_check(COPY, mask, int(mask.sum()), cfg(1, 8), lookback=lookback, h=8)
    assert header() == [0, 0, before[2] + 1]


def test_200_launches_back_to_back():
    """200 merges queued without a sync, masks and sizes changing (the workspace grows on the way): each right."""
    g = torch.Generator().manual_seed(6)
    sizes = torch.randint(1, 300_000, (200,), generator=g).tolist()
    cases = []
    for step, n in enumerate(sizes):
        mask = make_mask(n, ("random50", "random5", "blocks", "random90", "bytes")[step % 5], seed=step)
        k = int(true_rows(mask).sum())
        m = max(0, k + (step % 7) - 3)  # K = M, or a few rows either way
        dense = rand((n, 16), torch.bfloat16, seed=step)
        compact = rand((m, 16), torch.bfloat16, seed=step + 1)
        mode = (COPY, ADD, GATHER)[step % 3]
        cases.append((mode, mask, dense, compact, expected(mode, dense, compact, mask)))
    torch.cuda.synchronize()
    for mode, mask, dense, compact, _ in cases:
        scan_copy.mask_scan_copy(dense, compact, mask.view(torch.uint8), mode, cfg(1 + 3 * (mode == ADD), 16))
    torch.cuda.synchronize()
    for step, (_, _, dense, compact, want) in enumerate(cases):
        assert_same(dense, want[0], f"dense of launch {step}")
        assert_same(compact, want[1], f"compact of launch {step}")
    assert header()[:2] == [0, 0]


def test_two_streams_at_once_use_their_own_workspaces():
    """Long merges queued alternately on two streams, so they run at the same time: each right, and each
    stream's workspace advanced by its own launches only."""
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    gens = []
    for s in streams:
        with torch.cuda.stream(s):
            scan_copy.workspace(DEV, 2**20)  # large enough for the launches below
            gens.append(header()[2])
    cases = []
    for step in range(20):
        mask = make_mask(2**20, "random50" if step % 2 else "blocks", seed=100 + step)
        dense = rand((2**20, 8), torch.float32, seed=step)
        compact = rand((int(mask.sum()), 8), torch.float32, seed=step + 1)
        cases.append((mask, dense, compact, expected(COPY, dense, compact, mask)))
    torch.cuda.synchronize()
    for step, (mask, dense, compact, _) in enumerate(cases):
        s = streams[step % 2]
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # the tensors stay referenced until the synchronize below
            scan_copy.mask_scan_copy(dense, compact, mask.view(torch.uint8), COPY, cfg(1, 8))
    torch.cuda.synchronize()
    for step, (_, dense, _, want) in enumerate(cases):
        assert_same(dense, want[0], f"launch {step} on stream {step % 2}")
    for s, gen in zip(streams, gens):
        with torch.cuda.stream(s):
            assert header() == [0, 0, gen + 10]


class Static:
    """The buffers a graph reads: mask [N] bool, dense [N, H] bf16, compact [M, H] fp32, on the GPU."""

    N, M = 200_000, 60_000

    def __init__(self, seed: int):
        self.mask = make_mask(self.N, "random50", seed)
        self.dense = rand((self.N, H), torch.bfloat16, seed=seed)
        self.compact = rand((self.M, H), torch.float32, seed=seed + 1)

    def merge(self, mode: int) -> None:
        scan_copy.mask_scan_copy(self.dense, self.compact, self.mask.view(torch.uint8), mode, cfg(2))

    def new_prompt(self, mode: int, seed: int, k: int):
        """New contents with ``k`` true rows; returns what the merge must leave (dense, compact)."""
        self.mask.zero_()
        self.mask[torch.randperm(self.N, device=DEV, generator=torch.Generator(DEV).manual_seed(seed))[:k]] = True
        self.dense.copy_(rand((self.N, H), torch.bfloat16, seed=seed))
        self.compact.copy_(rand((self.M, H), torch.float32, seed=seed + 1))
        return expected(mode, self.dense, self.compact, self.mask)

    def check(self, want, what: str) -> None:
        assert_same(self.dense, want[0], f"dense, {what}")
        assert_same(self.compact, want[1], f"compact, {what}")


@pytest.mark.parametrize("reserve", ["reserve", "no_reserve"])
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_cuda_graph_replays_with_new_mask_contents(mode, reserve, monkeypatch):
    """Replays read the mask buffer's current contents, K = M, fewer or more true rows than M. The captured
    workspace comes from the reserve an eager call made (no memset node), or, with none, is zeroed in the graph."""
    st = Static(seed=1)
    if reserve == "reserve":
        g = capture(lambda: st.merge(mode))
        assert scan_copy._reserve[DEV.index][1] > 0, "the captured workspace is not the reserve's"
    else:
        g = capture(lambda: st.merge(mode), lambda: monkeypatch.setattr(scan_copy, "_reserve", {}))
        assert scan_copy._reserve == {}
    for seed, k in ((10, Static.M), (20, Static.M - 12345), (30, Static.M + 777), (40, 0), (50, Static.M)):
        want = st.new_prompt(mode, seed, k)
        g.replay()
        torch.cuda.synchronize()
        st.check(want, f"replay {seed}, K={k}")


def test_graphs_and_eager_calls_at_once_on_three_streams():
    """Two graphs, each capturing two merges, replayed on two streams while eager merges run on a third:
    every workspace is its own, every result right."""
    pairs = [(Static(seed=1), Static(seed=2)), (Static(seed=3), Static(seed=4))]
    graphs = [capture(lambda a=a, b=b: (a.merge(COPY), b.merge(ADD))) for a, b in pairs]
    streams = [torch.cuda.Stream() for _ in range(3)]
    eager = Static(seed=5)
    for round_ in range(5):
        wants = [(a.new_prompt(COPY, 100 * round_ + 1, Static.M - round_ * 1000),
                  b.new_prompt(ADD, 100 * round_ + 2, Static.M + round_ * 1000)) for a, b in pairs]
        eager_want = eager.new_prompt(GATHER, 100 * round_ + 3, Static.M - 5)
        torch.cuda.synchronize()
        for g, s in zip(graphs, streams):
            with torch.cuda.stream(s):
                g.replay()
        with torch.cuda.stream(streams[2]):
            eager.merge(GATHER)
        torch.cuda.synchronize()
        for (a, b), (want_a, want_b) in zip(pairs, wants):
            a.check(want_a, f"round {round_}, first merge")
            b.check(want_b, f"round {round_}, second merge")
        eager.check(eager_want, f"round {round_}, eager")


def test_no_host_sync():
    """After a first call (compiles, makes the workspace), merges under set_sync_debug_mode("error"), one of
    them growing the workspace and one on a new stream (a new workspace), raise nothing."""
    masks = [make_mask(5000, "random50", seed=7), make_mask(5000, "blocks"), make_mask(3_000_000, "random50", seed=8),
             make_mask(5000, "random5", seed=9)]
    run_and_check(COPY, masks[0], int(masks[0].sum()), cfg(1))
    cases = []
    for mask in masks:
        dense = rand((mask.numel(), H), torch.bfloat16, seed=9)
        compact = rand((int(mask.sum()), H), torch.float32, seed=10)
        cases.append((mask, dense, compact, expected(COPY, dense, compact, mask)))
    fresh = torch.cuda.Stream()
    torch.cuda.synchronize()
    with sync_debug_error():
        for step, (mask, dense, compact, _) in enumerate(cases):
            fresh.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(fresh if step == len(cases) - 1 else torch.cuda.current_stream()):
                scan_copy.mask_scan_copy(dense, compact, mask.view(torch.uint8), COPY, cfg(1))
    torch.cuda.synchronize()
    for step, (_, dense, _, want) in enumerate(cases):
        assert_same(dense, want[0], f"merge {step}")


def test_n_times_h_past_2_to_the_31():
    """dense and compact [2**20, 2112] bf16 (2.2e9 elements each): 64-bit addresses."""
    n, h = 2**20, 2112
    mask = make_mask(n, "random90", seed=11)
    mask[-1000:] = True
    k = int(mask.sum())
    dense = torch.zeros(n, h, dtype=torch.bfloat16, device=DEV)
    compact = torch.arange(k, device=DEV, dtype=torch.float32)[:, None].expand(k, h).to(torch.bfloat16)
    scan_copy.mask_scan_copy(dense, compact, mask.view(torch.uint8), COPY, cfg(8, 1024))
    torch.cuda.synchronize()
    assert torch.equal(dense[mask], compact)
    assert not dense[~mask].any()
