"""A captured merge replays at any M: a serving engine captures its padded prefill once, over static buffers
dst [N_pad, H], a device mask [N_pad] and src [M_max, H], then per step writes new contents into them and
replays. The mask's true rows K change with the prompt (0, 1, a third of M_max, all of it; scattered or in image
blocks). Without check_count a device mask is never counted on the host, so a replay merges the K true rows
from src's first K rows and reads none of the later ones: those hold NaN and a sentinel here, so that a read
into dst would show. Every replay runs under set_sync_debug_mode("error") and is compared bit for bit with
PyTorch's ``ref[mask] = src[:K].to(dst.dtype)`` on the step's clones (rows outside the mask unchanged).
Capturing a CPU mask raises: test_cuda_graph.test_capturing_a_cpu_mask_raises."""
import math
import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton.kernel_config import FUSED_BELOW  # noqa: E402

from gpu_helpers import (DTYPE_PAIRS, assert_same, capture, dev, pair_id, rand, random_mask, reference,  # noqa: E402
                         sync_debug_error)

DEV = dev()
H = 256
# N_pad -> M_max. Under FUSED_BELOW (16384) rows a device mask takes the one-launch kernel, above it the row
# map and the row copy (two launches): with the tuned table and with the untuned rule alike.
M_MAX = {512: 200, 4096: 1500, 40000: 12000}
STEPS = 6  # replays per graph: each of K = 0, 1, M_max // 3, M_max once, in a shuffled order, then two more
LAYOUTS = ("scattered", "blocks")
# Qwen3-VL's bf16, then each dtype once more as a source and as a destination (all nine pairs: the merge test)
DEEPSTACK_PAIRS = ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16), (torch.float16, torch.float32))
SENTINEL = -8192.0  # exact in every dtype here


def image_blocks(n: int, k: int, seed: int) -> torch.Tensor:
    """A CPU bool mask [n] whose k true rows lie in 1-6 contiguous runs (images) at seeded random places."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    if k == 0:
        return mask
    blocks = int(torch.randint(1, min(k, 6) + 1, (1,), generator=g))
    cuts = (torch.randperm(k - 1, generator=g)[:blocks - 1] + 1).sort().values.tolist()
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, k])]
    free = n - k
    ends = torch.randint(0, free + 1, (blocks,), generator=g).sort().values.tolist()
    gaps = [b - a for a, b in zip([0, *ends], ends)]  # before each block; the rest of free follows the last
    at = 0
    for gap, size in zip(gaps, sizes):
        at += gap
        mask[at:at + size] = True
        at += size
    return mask


def poisoned(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t`` [..., M, H] with its source rows from k on set to NaN (even columns) and SENTINEL (odd ones): rows
    that a replay must not read."""
    unused = t.narrow(-2, k, t.shape[-2] - k)
    unused[..., 0::2] = math.nan
    unused[..., 1::2] = SENTINEL
    return t


class Prefill:
    """The static buffers of one captured prefill: mask [n] bool and dst [n, H] on the device, src [m, H] and
    ``layers`` deepstack feature sets visual [layers, m, H] (src's dtype)."""

    def __init__(self, n: int, m: int, src_dtype: torch.dtype, dst_dtype: torch.dtype, layers: int = 0):
        self.n, self.m = n, m
        self.mask = torch.zeros(n, dtype=torch.bool, device=DEV)
        self.dst = torch.empty(n, H, dtype=dst_dtype, device=DEV)
        self.src = torch.empty(m, H, dtype=src_dtype, device=DEV)
        self.visual = torch.empty(layers, m, H, dtype=src_dtype, device=DEV)
        self.fill(m, "scattered", seed=0)  # what the capture's warm-up merges

    def fill(self, k: int, layout: str, seed: int):
        """One step: a mask of k true rows (``layout``), new dst, src and visual (their rows from k poisoned)
        copied into the buffers. Returns the copies (mask, dst, src, visual) the reference reads."""
        mask = random_mask((self.n,), k, seed) if layout == "scattered" else image_blocks(self.n, k, seed)
        mask = mask.to(DEV)
        dst = rand(self.dst.shape, self.dst.dtype, seed + 1)
        src = poisoned(rand(self.src.shape, self.src.dtype, seed + 2), k)
        visual = poisoned(rand(self.visual.shape, self.visual.dtype, seed + 3), k)
        for buffer, new in ((self.mask, mask), (self.dst, dst), (self.src, src), (self.visual, visual)):
            buffer.copy_(new)
        return mask, dst, src, visual


def steps(m: int, rng: random.Random) -> list[tuple[int, str, int]]:
    """(K, layout, seed) of each replay: every K of (0, 1, m // 3, m) once in a shuffled order, then random
    ones; the layouts alternate."""
    counts = [0, 1, m // 3, m]
    rng.shuffle(counts)
    counts += [rng.choice(counts) for _ in range(STEPS - len(counts))]
    return [(k, LAYOUTS[i % 2], rng.randrange(1 << 30)) for i, k in enumerate(counts)]


def replay(g: torch.cuda.CUDAGraph) -> None:
    with sync_debug_error():  # a synchronizing CUDA call through torch raises
        g.replay()


@pytest.mark.parametrize("path", ["auto", "triton"])
@pytest.mark.parametrize("n", sorted(M_MAX), ids=lambda n: f"N{n}")
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_merge_replays_at_any_m(pair, n, path):
    st = Prefill(n, M_MAX[n], *pair)
    kind = mt.explain(st.dst, st.src, st.mask, path=path).kind  # the kernel this test means to capture
    assert kind == ("device_fused" if n < FUSED_BELOW else "device_rows"), f"N_pad={n}, path={path!r} runs {kind}"
    g = capture(lambda: mt.merge_multimodal_embeddings(st.dst, st.src, st.mask, path=path))
    for k, layout, seed in steps(st.m, random.Random(f"merge {pair_id(pair)} {n} {path}")):
        mask, dst, src, _ = st.fill(k, layout, seed)
        replay(g)
        assert_same(st.dst, reference(dst, mask, src[:k]), f"K={k} of M_max={st.m}, {layout}, seed {seed}")


@pytest.mark.parametrize("n", sorted(M_MAX), ids=lambda n: f"N{n}")
@pytest.mark.parametrize("pair", DEEPSTACK_PAIRS, ids=pair_id)
def test_merge_then_deepstack_adds_through_a_plan_updated_in_the_graph(pair, n):
    """Qwen3-VL's prefill in one graph: the merge, then the plan's row map rebuilt from the device mask, then
    two deepstack adds through it (deepstack_add, and masked_row_scatter_ with accumulate=True). dst stands
    in for the hidden states: each add must see the merge and the add before it."""
    st = Prefill(n, M_MAX[n], *pair, layers=2)
    plan = mt.MergePlan(st.mask)  # its buffers allocated before capture; the graph rewrites them

    def step():
        mt.merge_multimodal_embeddings(st.dst, st.src, st.mask)
        plan.update_(st.mask)
        mt.deepstack_add(st.dst, st.visual[0], plan)
        mt.masked_row_scatter_(st.dst, src=st.visual[1], plan=plan, accumulate=True)

    g = capture(step)
    for k, layout, seed in steps(st.m, random.Random(f"deepstack {pair_id(pair)} {n}")):
        mask, dst, src, visual = st.fill(k, layout, seed)
        replay(g)
        expected = reference(dst, mask, src[:k])
        for features in visual:
            expected = reference(expected, mask, features[:k], accumulate=True)
        assert_same(st.dst, expected, f"K={k} of M_max={st.m}, {layout}, seed {seed}")
