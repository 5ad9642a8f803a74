"""CUDA graphs: a merge that reads its row map from the device (a MergePlan, or a GPU mask) is captured
once and replayed for new prompts: write the new mask into the static mask buffer, refresh the plan
(outside the graph, or captured in it), refill dst/src, replay. A CPU mask is staged per call, so
capturing it must raise RuntimeError."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import executor  # noqa: E402
from mmmerge_triton.kernel_config import KernelConfig  # noqa: E402

from gpu_helpers import assert_same, capture, dev, first_true, rand, random_mask, reference  # noqa: E402

DEV = dev()
N, H, M = 3000, 256, 700
DST_DT, SRC_DT = torch.bfloat16, torch.float32


class Static:
    """The static buffers a graph reads: mask_buf [N] bool (GPU), dst [N, H], src [M, H]."""

    def __init__(self):
        self.mask_buf = random_mask((N,), M, seed=1).to(DEV)
        self.dst = rand((N, H), DST_DT, seed=2)
        self.src = rand((M, H), SRC_DT, seed=3)

    def new_prompt(self, seed, k=M):
        """Fill the buffers with a new prompt whose mask has ``k`` true rows; return (mask, dst, src) as written."""
        mask = random_mask((N,), k, seed=seed)
        dst = rand((N, H), DST_DT, seed=seed + 1)
        src = rand((M, H), SRC_DT, seed=seed + 2)
        self.mask_buf.copy_(mask)
        self.dst.copy_(dst)
        self.src.copy_(src)
        return mask, dst, src


def expected_for(mask, dst, src, accumulate, times=1):
    """The reference, with the documented semantics for a count mismatch (first min(K, M) true rows)."""
    j = min(int(mask.sum()), src.shape[0])
    out = dst
    for _ in range(times):
        out = reference(out, first_true(mask, j), src[:j], accumulate)
    return out


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
def test_plan_updated_outside_the_graph(accumulate):
    st = Static()
    plan = mt.MergePlan(st.mask_buf)
    g = capture(lambda: mt.masked_row_scatter_(st.dst, src=st.src, plan=plan, accumulate=accumulate))
    for seed, k in ((10, M), (20, M), (30, M - 123), (40, M + 77)):
        mask, dst, src = st.new_prompt(seed, k)
        plan.update_(st.mask_buf)
        g.replay()
        torch.cuda.synchronize()
        assert_same(st.dst, expected_for(mask, dst, src, accumulate), f"prompt {seed}, K={k}")
    if accumulate:  # two replays without a refill add twice
        mask, dst, src = st.new_prompt(50)
        plan.update_(st.mask_buf)
        g.replay()
        g.replay()
        torch.cuda.synchronize()
        assert_same(st.dst, expected_for(mask, dst, src, True, times=2))


def test_plan_update_captured_in_the_graph():
    st = Static()
    plan = mt.MergePlan(st.mask_buf)

    def step():
        plan.update_(st.mask_buf)
        mt.masked_row_scatter_(st.dst, src=st.src, plan=plan)

    g = capture(step)
    for seed, k in ((10, M), (20, M), (30, M - 300), (40, M + 5)):
        mask, dst, src = st.new_prompt(seed, k)
        g.replay()
        torch.cuda.synchronize()
        assert_same(st.dst, expected_for(mask, dst, src, False), f"prompt {seed}, K={k}")


def test_plan_from_cpu_mask_replayed():
    """A plan built from a CPU mask (rows copied to the device) is capturable too; update_ with a new CPU
    mask outside the graph, then replay."""
    st = Static()
    plan = mt.MergePlan(random_mask((N,), M, seed=5), device=DEV)
    g = capture(lambda: mt.masked_row_scatter_(st.dst, src=st.src, plan=plan))
    for seed in (10, 20):
        mask, dst, src = st.new_prompt(seed)
        plan.update_(mask)  # the CPU mask itself
        g.replay()
        torch.cuda.synchronize()
        assert_same(st.dst, expected_for(mask, dst, src, False))


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("how", ["api", "fused", "two_pass"])
def test_gpu_mask_without_plan(how, accumulate):
    """The device-mask kernels read the mask buffer itself at replay (the two-pass one builds its row map in
    the graph's memory pool)."""
    st = Static()
    if how == "api":
        def fn():
            mt.masked_row_scatter_(st.dst, st.mask_buf, st.src, accumulate=accumulate, path="triton")
    else:
        cfg = KernelConfig(16, 256, 8, 1, how == "fused")

        def fn():
            executor.merge_triton(st.dst, st.mask_buf, st.src, accumulate, config=cfg)
    g = capture(fn)
    for seed, k in ((10, M), (20, M - 50), (30, M + 50)):
        mask, dst, src = st.new_prompt(seed, k)
        g.replay()
        torch.cuda.synchronize()
        assert_same(st.dst, expected_for(mask, dst, src, accumulate), f"prompt {seed}, K={k}")


@pytest.mark.parametrize("how", ["triton", "auto", "merge"])
def test_capturing_a_cpu_mask_raises(how):
    mask = random_mask((N,), M, seed=7)
    dst = rand((N, H), DST_DT, seed=8)
    src = rand((M, H), SRC_DT, seed=9)

    def fn():
        if how == "merge":
            mt.merge_multimodal_embeddings(dst, src, mask)
        else:
            mt.masked_row_scatter_(dst, mask, src, path=how)

    fn()  # warm-up: compiles outside capture
    torch.cuda.synchronize()
    before = dst.clone()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(g):
            fn()
    torch.cuda.synchronize()
    assert_same(dst, before)
    # the device is still usable, and the same call works outside capture
    dst2 = rand((N, H), DST_DT, seed=10)
    expected = reference(dst2, mask, src)
    mt.masked_row_scatter_(dst2, mask, src, path="triton")
    assert_same(dst2, expected)


# ---------------------------------------------------------------------------------------------------------
# Lists of items: merge_items stages its item tables (and, for a CPU mask, the row map) in the pinned ring
# and copies them to the device per call. A captured graph would replay that copy from ring memory that later
# calls rewrite, so capture must either be refused (RuntimeError) or replays must stay right after the ring
# has lapped. A wrong replay can fault the device, so each case runs in its own process.
# ---------------------------------------------------------------------------------------------------------
_ITEMS_GRAPH_SCRIPT = r'''
import sys, torch
import mmmerge_triton as mt
from gpu_helpers import assert_same, dev, first_true, rand, random_mask, reference
how = sys.argv[1]
DEV = dev()
N, H, M = 3000, 256, 700
mask_buf = random_mask((N,), M, seed=1).to(DEV)
mask_cpu = random_mask((N,), M, seed=1)
dst = rand((N, H), torch.bfloat16, seed=2)
src = rand((M, H), torch.float32, seed=3)
items = [src[:300], src[300:]]  # one row stride: read in place by the multi-item kernel
plan = mt.MergePlan(mask_buf) if how == "plan" else None

def fn():
    if how == "plan":
        mt.merge_multimodal_embeddings(dst, items, plan=plan, path="triton")
    elif how == "gpu_mask":
        mt.merge_multimodal_embeddings(dst, items, mask_buf, path="triton")
    else:
        mt.merge_multimodal_embeddings(dst, items, mask_cpu, path="triton")

s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(3):
        fn()
torch.cuda.current_stream().wait_stream(s)
g = torch.cuda.CUDAGraph()
try:
    with torch.cuda.graph(g):
        fn()
except RuntimeError as error:
    print("REFUSED", str(error).splitlines()[0])
    sys.exit(0)
torch.cuda.synchronize()
if how == "cpu_mask":  # staged per call: a replay would read whatever the ring holds by then
    print("CAPTURED")
    sys.exit(0)
# churn the ring: CPU-mask merges whose row maps fill a quarter each, two laps
n2 = 400000
scratch = torch.zeros(n2, 1, device=DEV)
for i in range(8):
    k = 200000 + i
    mt.masked_row_scatter_(scratch, random_mask((n2,), k, seed=100 + i), torch.ones(k, 1, device=DEV), path="triton")
torch.cuda.synchronize()
for seed in (10, 20):
    mask = random_mask((N,), M, seed=seed)
    new_dst, new_src = rand((N, H), torch.bfloat16, seed=seed + 1), rand((M, H), torch.float32, seed=seed + 2)
    mask_buf.copy_(mask)
    if plan is not None:
        plan.update_(mask_buf)
    dst.copy_(new_dst)
    src.copy_(new_src)
    g.replay()
    torch.cuda.synchronize()
    expected = reference(new_dst, mask, new_src)
    assert_same(dst, expected, f"replay {seed}")
print("REPLAYED_RIGHT")
'''


@pytest.mark.parametrize("how", ["cpu_mask", "gpu_mask", "plan"])
def test_item_list_capture_is_refused_or_replays_right(how):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", _ITEMS_GRAPH_SCRIPT, how], capture_output=True, text=True,
                          env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the captured item-list merge failed (rc {proc.returncode}):\n{out[-3000:]}"
    if how == "cpu_mask":  # a CPU mask is staged per call, as with a single tensor: capture must be refused
        assert "REFUSED" in out, f"a CPU-mask item-list merge was captured without an error:\n{out[-3000:]}"
    else:
        assert "REFUSED" in out or "REPLAYED_RIGHT" in out, out[-3000:]
