"""merge_modalities_ on the GPU, bit for bit against PyTorch's sequential chain on a clone (one
``masked_scatter_(mask[..., None], src.to(dst.dtype))`` per mask pair, ``index_copy_(0, positions, ...)`` per
positions pair, ``index_put_(..., accumulate=True)`` with accumulate, in list order), with CPU indexes and with
indexes on the GPU: the omni layouts of notes/omni.md (Qwen2.5-Omni's blocks and use_audio_in_video chunks,
Qwen3-Omni's token-by-token alternation), every dtype pair, a 64k x 4096 bf16 sequence, one kernel for three
modalities (a spy and the profiler), no host sync with device indexes, the device semantics (the last pair that
names a row wins; a device mask's first min(K, M) rows; device positions out of range skipped), gradients, and
the errors (mixed index devices, check_count's host checks) raised before anything is written, twice each.
"""
import sys

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402
from mmmerge_triton import executor, items  # noqa: E402

from gpu_helpers import DTYPE_PAIRS, assert_same, dev, first_true, pair_id, rand, sync_debug_error  # noqa: E402

DEV = dev()
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
N, H = 4096, 256
TEXT, AUDIO, IMAGE, VIDEO = 0, 1, 2, 3


# ---- inputs and the reference -----------------------------------------------------------------------------------

def labels_of(runs, n: int = N) -> torch.Tensor:
    """A CPU label per row [n] (TEXT past the runs): ``runs`` a list of (label, length)."""
    labels = torch.cat([torch.full((length,), label, dtype=torch.int8) for label, length in runs])
    assert labels.numel() <= n
    return torch.cat([labels, torch.zeros(n - labels.numel(), dtype=torch.int8)])


def qwen25_omni_labels(n: int = N) -> torch.Tensor:
    """Audio, image and video blocks between text, as the Qwen2.5-Omni thinker merges them."""
    return labels_of([(TEXT, 40), (AUDIO, 500), (TEXT, 9), (IMAGE, 1024), (TEXT, 3), (VIDEO, 2000)], n)


def audio_in_video_labels(n: int = N, chunks: int = 24, video: int = 100, audio: int = 50) -> torch.Tensor:
    """An image, then use_audio_in_video's 2 s chunks: video and audio alternating (Qwen2.5-Omni)."""
    runs = [(TEXT, 7), (IMAGE, 256), (TEXT, 5)]
    for _ in range(chunks):
        runs += [(VIDEO, video), (AUDIO, audio)]
    return labels_of(runs, n)


def alternation_labels(n: int = N, seed: int = 0) -> torch.Tensor:
    """Video and audio tokens ordered by timestamp, token by token (Qwen3-Omni): a random V/A sequence."""
    g = torch.Generator().manual_seed(seed)
    span = torch.where(torch.rand(3000, generator=g) < 0.6, VIDEO, AUDIO).to(torch.int8)
    return torch.cat([torch.full((50,), TEXT, dtype=torch.int8), span,
                      torch.zeros(n - 50 - span.numel(), dtype=torch.int8)])


def masks_of(labels: torch.Tensor, order=(AUDIO, IMAGE, VIDEO), shape=None) -> list:
    return [(labels == k).view(shape or labels.shape) for k in order]


def pairs_of(indexes, dtypes=(BF16,), seed: int = 10, device=DEV) -> list:
    """(index on ``device``, src [rows named, H] on the GPU) per index."""
    out = []
    for k, index in enumerate(indexes):
        rows = int(index.sum()) if index.dtype == torch.bool else index.shape[0]
        out.append((index.to(device), rand((rows, H), dtypes[k % len(dtypes)], seed=seed + k)))
    return out


def chain(dst: torch.Tensor, pairs, accumulate: bool = False) -> torch.Tensor:
    """PyTorch's sequential answer on a clone (indexes moved to dst's device)."""
    out = dst.detach().clone()
    for index, src in pairs:
        index, value = index.to(out.device), src.detach().to(out.dtype)
        if index.dtype != torch.bool:
            index = index.long()
        if accumulate:
            out.index_put_((index,), value, accumulate=True)
        elif index.dtype == torch.bool:
            out.masked_scatter_(index[..., None], value)
        else:
            out.index_copy_(0, index, value)
    return out


class Spy:
    """Launches of the copy (items' multi_row_copy, executor.row_copy) and merges per pair, counted."""

    def __init__(self, monkeypatch):
        self.items, self.row_copy, self.per_pair = [], [], []
        caller = sys.modules[mt.merge_modalities_.__module__]  # the module whose per-pair merges the call finds
        for module, name, calls in ((items, "_launch", self.items), (executor, "row_copy", self.row_copy),
                                    (caller, "masked_row_scatter_", self.per_pair),
                                    (caller, "indexed_row_scatter_", self.per_pair)):
            monkeypatch.setattr(module, name, self._counted(getattr(module, name), calls))

    @staticmethod
    def _counted(original, calls):
        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)
        return counted

    def launches(self) -> int:
        return len(self.items) + len(self.row_copy)

    def clear(self) -> None:
        for calls in (self.items, self.row_copy, self.per_pair):
            calls.clear()


@pytest.fixture
def spy(monkeypatch) -> Spy:
    return Spy(monkeypatch)


def merged_twice(dst, pairs, spy=None, **kwargs) -> torch.Tensor:
    """merge_modalities_ on two fresh clones (the second call meets the memoized decision): both results equal,
    each the dst passed; with ``spy``, the second run's calls equal the first's. Returns the result."""
    outs, seen = [], []
    for _ in range(2):
        out = dst.clone()
        if spy is not None:
            spy.clear()
        assert mt.merge_modalities_(out, pairs, **kwargs) is out
        outs.append(out)
        if spy is not None:  # a pair merged by its own call launches the kernel bound on a memo hit directly,
            # not through scatter.row_copy: its row copies are not compared
            seen.append((len(spy.items), None if spy.per_pair else len(spy.row_copy), len(spy.per_pair)))
    assert_same(outs[1], outs[0], "second call")
    if spy is not None:
        assert seen[0] == seen[1], seen
    return outs[0]


# ---- layouts ------------------------------------------------------------------------------------------------------

def _layout(name: str, device):
    """(dst, pairs, whether the sources share a row layout)."""
    if name == "qwen25_omni_audio_image_video":
        return rand((N, H), BF16, seed=1), pairs_of(masks_of(qwen25_omni_labels()), device=device), True
    if name == "audio_in_video_chunks":
        return rand((N, H), BF16, seed=2), pairs_of(masks_of(audio_in_video_labels()), device=device), True
    if name == "token_alternation":
        labels = alternation_labels()
        return rand((N, H), BF16, seed=3), pairs_of(masks_of(labels, (VIDEO, AUDIO)), device=device), True
    if name == "positions_between_masks":
        labels = audio_in_video_labels()
        g = torch.Generator().manual_seed(4)
        text = (labels == TEXT).nonzero().flatten()
        positions = text[torch.randperm(text.numel(), generator=g)[:300]]  # unsorted, int64
        audio, _, video = masks_of(labels)
        return rand((N, H), F32, seed=4), pairs_of([audio, positions.to(torch.int32), video], device=device), True
    if name == "empty_sources":
        audio, image, video = masks_of(qwen25_omni_labels())
        empty = torch.zeros(N, dtype=torch.bool)
        indexes = [empty, audio, torch.zeros(0, dtype=torch.long), video, empty]
        return rand((N, H), F16, seed=5), pairs_of(indexes, device=device), True
    if name == "all_rows":
        labels = torch.arange(N) % 3
        return rand((N, H), BF16, seed=6), pairs_of([labels == k for k in range(3)], device=device), True
    if name == "batched_bsh":
        labels = audio_in_video_labels(n=N, chunks=12)
        return (rand((4, N // 4, H), BF16, seed=7), pairs_of(masks_of(labels, shape=(4, N // 4)), device=device),
                True)
    if name == "mixed_src_dtypes":
        indexes = masks_of(audio_in_video_labels())
        return rand((N, H), BF16, seed=8), pairs_of(indexes, dtypes=(F32, F16, BF16), device=device), False
    if name == "column_strided_src":
        audio, image, video = masks_of(audio_in_video_labels())
        pairs = pairs_of([audio, image], device=device)
        strided = rand((H, int(video.sum())), BF16, seed=9).t()
        return rand((N, H), BF16, seed=9), pairs + [(video.to(device), strided)], False
    raise AssertionError(name)


LAYOUTS = ["qwen25_omni_audio_image_video", "audio_in_video_chunks", "token_alternation", "positions_between_masks",
           "empty_sources", "all_rows", "batched_bsh", "mixed_src_dtypes", "column_strided_src"]


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu_indexes", "gpu_indexes"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_sequential_chain(name, on_gpu, accumulate, spy):
    dst, pairs, shared = _layout(name, DEV if on_gpu else "cpu")
    expected = chain(dst, pairs, accumulate)
    assert_same(merged_twice(dst, pairs, spy, accumulate=accumulate, path="triton"), expected, f"{name} triton")
    if accumulate and on_gpu:  # device indexes may overlap unseen: each pair's adds must land, so pair by pair
        assert len(spy.per_pair) == len(pairs) and spy.items == [], "accumulate at device indexes: per pair"
    else:
        assert spy.per_pair == [] and spy.launches() == 1, "one launch for every pair"
        assert len(spy.items) == int(shared), "sources read in place exactly when they share a row layout"
    assert_same(merged_twice(dst, pairs, accumulate=accumulate), expected, f"{name} auto")
    assert_same(merged_twice(dst, pairs, accumulate=accumulate, path="index_put"), expected, f"{name} index_put")


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu_indexes", "gpu_indexes"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_every_dtype_pair(pair, on_gpu, accumulate):
    src_dtype, dst_dtype = pair
    labels = audio_in_video_labels()
    text = (labels == TEXT).nonzero().flatten()[:100].flip(0)
    audio, image, video = masks_of(labels)
    pairs = pairs_of([audio, text, video, image], dtypes=(src_dtype,), device=DEV if on_gpu else "cpu")
    dst = rand((N, H), dst_dtype, seed=11)
    expected = chain(dst, pairs, accumulate)
    assert_same(merged_twice(dst, pairs, accumulate=accumulate, path="triton"), expected, pair_id(pair))
    assert_same(merged_twice(dst, pairs, accumulate=accumulate), expected, f"{pair_id(pair)} auto")


@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu_indexes", "gpu_indexes"])
def test_64k_by_4096_bf16(on_gpu):
    """A 64k-token sequence of hidden size 4096 in bf16: an image, use_audio_in_video chunks, 256 positions."""
    n, h = 65536, 4096
    labels = audio_in_video_labels(n=n, chunks=200, video=200, audio=100)
    text = (labels == TEXT).nonzero().flatten()[-256:]
    device = DEV if on_gpu else "cpu"
    indexes = masks_of(labels) + [text]
    pairs = [(index.to(device), rand((int(index.sum()) if index.dtype == torch.bool else index.numel(), h), BF16,
                                      seed=20 + k)) for k, index in enumerate(indexes)]
    dst = rand((n, h), BF16, seed=19)
    expected = chain(dst, pairs)
    out = dst.clone()
    mt.merge_modalities_(out, pairs, path="triton")
    assert_same(out, expected, "64k x 4096")
    del out
    out = dst.clone()
    mt.merge_modalities_(out, pairs)
    assert_same(out, expected, "64k x 4096 auto")


# ---- one kernel ---------------------------------------------------------------------------------------------------

def _cuda_kernels(run) -> list[str]:
    """Names of the CUDA kernels ``run()`` launches (memory copies and sets left out), by torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not events:
        pytest.skip("torch.profiler recorded no CUDA activity on this machine (CUPTI unavailable)")
    return [e.name for e in events if not e.name.startswith(("Memcpy", "Memset"))]


@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu_indexes", "gpu_indexes"])
def test_auto_takes_one_launch_for_cpu_indexes_and_pairs_for_device_ones(on_gpu, spy):
    """path="auto": one launch for CPU indexes; pair by pair for device ones (their map cost more than the launches
    it saves: bench/results/h100/2026-12-06-s3/positions.log). The same result either way."""
    dst, pairs, _ = _layout("audio_in_video_chunks", DEV if on_gpu else "cpu")
    assert_same(merged_twice(dst, pairs, spy), chain(dst, pairs), "auto")
    if on_gpu:
        assert len(spy.per_pair) == len(pairs) and spy.items == [], "device indexes under auto: pair by pair"
    else:
        assert spy.per_pair == [] and spy.launches() == 1, "CPU indexes under auto: one launch"


@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu_indexes", "gpu_indexes"])
def test_three_modalities_one_copy_kernel(on_gpu, spy):
    dst, pairs, _ = _layout("audio_in_video_chunks", DEV if on_gpu else "cpu")
    mt.merge_modalities_(dst.clone(), pairs, path="triton")  # compiles
    out = dst.clone()
    spy.clear()
    kernels = _cuda_kernels(lambda: mt.merge_modalities_(out, pairs, path="triton"))
    assert len(spy.items) == 1 and spy.row_copy == [] and spy.per_pair == []
    copies = [k for k in kernels if "row_copy" in k]
    assert copies == [k for k in copies if "multi_row_copy" in k] and len(copies) == 1, kernels
    if on_gpu:
        assert sum("mask_to_rows" in k for k in kernels) == 3, kernels  # one map part per mask
    else:
        # A CPU map and the item table are staged in the pinned ring and sent by its copy kernel: no map kernel.
        assert [k for k in kernels if k not in copies] == ["copy_words_kernel"], kernels
    assert_same(out, chain(dst, pairs))


# ---- device indexes: no sync, the last pair wins, counts ---------------------------------------------------------

def _overlaps(name: str):
    """Device-index cases whose expected result is the sequential chain as it is (the last pair wins)."""
    labels = audio_in_video_labels()
    audio, image, video = masks_of(labels)
    if name == "image_mask_equals_video_mask":  # glm4v / lfm3_vl / nemotron: one token id for both
        return pairs_of([image, image.clone()])
    if name == "partial_overlaps":
        wide = video.clone()
        wide[: N // 2] = True
        return pairs_of([audio | image, wide, audio & (torch.arange(N) % 2 == 0)])
    if name == "positions_over_a_mask":
        return pairs_of([image, (image.nonzero().flatten()[::3]).flip(0), audio])
    if name == "mask_over_positions":
        return pairs_of([torch.arange(0, N, 5, dtype=torch.int32), video, image])
    raise AssertionError(name)


OVERLAPS = ["image_mask_equals_video_mask", "partial_overlaps", "positions_over_a_mask", "mask_over_positions"]


@pytest.mark.parametrize("name", OVERLAPS)
def test_overlapping_device_indexes_last_pair_wins(name, spy):
    pairs = _overlaps(name)
    dst = rand((N, H), BF16, seed=30)
    expected = chain(dst, pairs)
    assert_same(merged_twice(dst, pairs, spy, path="triton"), expected, name)
    assert spy.launches() == 1 and spy.per_pair == []
    assert_same(merged_twice(dst, pairs, spy), expected, f"{name} auto")  # device indexes: pair by pair
    assert len(spy.per_pair) == len(pairs) and spy.items == []
    assert_same(merged_twice(dst, pairs, path="index_put"), expected, f"{name} index_put")


@pytest.mark.parametrize("name", OVERLAPS)
def test_overlapping_device_indexes_accumulate_every_pair(name):
    pairs = _overlaps(name)
    dst = rand((N, H), F32, seed=31)
    expected = chain(dst, pairs, accumulate=True)
    assert_same(merged_twice(dst, pairs, path="index_put", accumulate=True), expected, "index_put")
    assert_same(merged_twice(dst, pairs, path="triton", accumulate=True), expected, "triton")


def _counts(name: str):
    """(pairs, the pairs as the chain sees what they merge) for device-count cases."""
    audio, image, video = masks_of(qwen25_omni_labels())
    if name == "mask_fewer_rows_than_src":  # K < M: the first K rows move, the rest are unused
        pairs = pairs_of([audio, image, video])
        short = first_true(image, 700)
        pairs[1] = (short.to(DEV), pairs[1][1])
        return pairs, [pairs[0], (short, pairs[1][1][:700]), pairs[2]]
    if name == "mask_more_rows_than_src":  # K > M: the first M true rows take them, the rest keep their values
        pairs = pairs_of([audio, image, video])
        pairs[2] = (pairs[2][0], pairs[2][1][:1200])
        return pairs, [pairs[0], pairs[1], (first_true(video, 1200), pairs[2][1])]
    if name == "positions_out_of_range":  # skipped: no sync, no device assert
        positions = torch.tensor([-1, 5, N, 7, 2 ** 40, -(2 ** 40), 9])
        src = rand((7, H), BF16, seed=40)
        inside = torch.tensor([False, True, False, True, False, False, True])
        pairs = [pairs_of([audio])[0], (positions.to(DEV), src)]
        return pairs, [pairs[0], (positions[inside], src[inside.to(DEV)])]
    raise AssertionError(name)


COUNTS = ["mask_fewer_rows_than_src", "mask_more_rows_than_src", "positions_out_of_range"]


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("name", COUNTS)
def test_device_counts_move_the_first_rows(name, accumulate):
    pairs, seen = _counts(name)
    dst = rand((N, H), F32, seed=41)
    expected = chain(dst, seen, accumulate)
    assert_same(merged_twice(dst, pairs, accumulate=accumulate, path="triton"), expected, name)
    assert_same(merged_twice(dst, pairs, accumulate=accumulate), expected, f"{name} auto")


NO_SYNC = ["three_masks", "masks_and_positions", "overlapping_masks", "mask_fewer_rows_than_src",
           "positions_out_of_range", "mixed_src_dtypes", "cpu_masks"]


def _no_sync_case(name: str):
    """(pairs, the pairs as the chain sees them, path): device indexes by path="triton" (the one launch and its
    device map; path="auto" merges them pair by pair) and by "auto" for the count cases; CPU masks by
    path="triton" (their staged map)."""
    if name == "three_masks":
        pairs = pairs_of(masks_of(audio_in_video_labels()))
    elif name == "masks_and_positions":
        pairs = _layout("positions_between_masks", DEV)[1]
    elif name == "overlapping_masks":
        pairs = _overlaps("partial_overlaps")
    elif name in ("mask_fewer_rows_than_src", "positions_out_of_range"):
        return (*_counts(name), "auto")
    elif name == "mixed_src_dtypes":
        pairs = _layout("mixed_src_dtypes", DEV)[1]
    else:
        pairs = _layout("audio_in_video_chunks", "cpu")[1]
    return pairs, pairs, "triton"


@pytest.mark.parametrize("name", NO_SYNC)
def test_no_host_sync(name):
    """Warm once (compiles), then on fresh inputs under torch.cuda.set_sync_debug_mode("error")."""
    pairs, seen, path = _no_sync_case(name)
    dst = rand((N, H), BF16, seed=50)
    expected = chain(dst, seen)
    mt.merge_modalities_(dst.clone(), pairs, path=path)
    out = dst.clone()
    torch.cuda.synchronize()
    with sync_debug_error():
        mt.merge_modalities_(out, pairs, path=path)
    torch.cuda.synchronize()
    assert_same(out, expected, name)


def test_check_count_with_device_indexes_syncs():
    """check_count=True copies device indexes to the host: a sync, which "error" mode turns into a RuntimeError
    (so the mode is on in test_no_host_sync). Nothing is written."""
    pairs = pairs_of(masks_of(audio_in_video_labels()))
    dst = rand((N, H), BF16, seed=51)
    out = dst.clone()
    torch.cuda.synchronize()
    with sync_debug_error():
        with pytest.raises(RuntimeError, match="synchroniz"):
            mt.merge_modalities_(out, pairs, check_count=True)
    torch.cuda.synchronize()
    assert_same(out, dst)


# ---- errors -------------------------------------------------------------------------------------------------------

def _bad(name: str):
    """(pairs, check_count, error type, message pattern)."""
    audio, image, video = masks_of(audio_in_video_labels())
    if name == "cpu_and_gpu_masks":
        return [pairs_of([audio])[0], pairs_of([image], device="cpu")[0]], False, ValueError, \
            "every index must be on the CPU, or every one on dst's device"
    if name == "gpu_positions_and_cpu_mask":
        return [pairs_of([audio], device="cpu")[0], pairs_of([torch.arange(3)])[0]], False, ValueError, \
            "every index must be on the CPU, or every one"
    if name == "src_on_cpu":
        pairs = pairs_of([audio, image])
        return [pairs[0], (pairs[1][0], pairs[1][1].cpu())], False, ValueError, r"pairs\[1\] src is on cpu"
    if name == "check_count_short_src":
        pairs = pairs_of([audio, image, video])
        return [pairs[0], (pairs[1][0], pairs[1][1][:-1]), pairs[2]], True, ValueError, \
            r"^pairs\[1\]: Attempted to assign 255 multimodal tokens to 256 placeholders"
    if name == "check_count_long_src":
        pairs = pairs_of([audio, image, video])
        return [pairs[0], pairs[1], (pairs[2][0], rand((int(video.sum()) + 1, H), BF16))], True, ValueError, \
            r"^pairs\[2\]: Attempted to assign"
    if name == "check_count_overlap":
        return pairs_of([image, video | image]), True, ValueError, "pairs overlap"
    if name == "check_count_position_out_of_range":
        return pairs_of([audio, torch.tensor([4, N + 1])]), True, IndexError, \
            r"pairs\[1\] positions\[1\] = 4097 is out of range"
    raise AssertionError(name)


BAD = ["cpu_and_gpu_masks", "gpu_positions_and_cpu_mask", "src_on_cpu", "check_count_short_src",
       "check_count_long_src", "check_count_overlap", "check_count_position_out_of_range"]


@pytest.mark.parametrize("path", ["auto", "triton", "index_put"])
@pytest.mark.parametrize("name", BAD)
def test_errors_raise_before_writing(name, path):
    """Each raises its error with dst's bytes unchanged, twice, a good call of the same shapes between."""
    pairs, check_count, error, match = _bad(name)
    dst = rand((N, H), BF16, seed=60)
    good = pairs_of(masks_of(audio_in_video_labels()))
    messages = []
    for attempt in range(2):
        out = dst.clone()
        with pytest.raises(error, match=match) as raised:
            mt.merge_modalities_(out, pairs, path=path, check_count=check_count)
        torch.cuda.synchronize()
        assert_same(out, dst, f"{name}: dst after the error")
        messages.append(str(raised.value))
        if attempt == 0:
            mt.merge_modalities_(dst.clone(), good, path=path, check_count=check_count)
    assert messages[0] == messages[1]


def test_check_count_with_good_device_indexes():
    pairs = _layout("positions_between_masks", DEV)[1]
    dst = rand((N, H), F32, seed=61)
    assert_same(merged_twice(dst, pairs, check_count=True, path="triton"), chain(dst, pairs))


@pytest.mark.parametrize("path,on_gpu", [
    pytest.param("triton", False, id="triton-cpu_indexes"),
    pytest.param("triton", True, id="triton-gpu_indexes"),
    pytest.param("auto", True, id="auto-gpu_indexes"),  # device indexes: auto merges pair by pair
])
def test_dst_whose_rows_do_not_flatten(path, on_gpu):
    labels = audio_in_video_labels(n=N, chunks=12)
    pairs = pairs_of(masks_of(labels, shape=(4, N // 4)), device=DEV if on_gpu else "cpu")
    dst = rand((N // 4, 4, H), BF16, seed=70).transpose(0, 1)
    before = dst.clone()
    try:
        mt.merge_modalities_(dst, pairs, path=path)
    except ValueError as error:
        assert "flatten" in str(error)
        assert_same(dst, before)
        return
    assert_same(dst, chain(before, pairs))


# ---- gradients ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu_indexes", "gpu_indexes"])
@pytest.mark.parametrize("path", ["auto", "triton"])
def test_gradients_match_the_masked_scatter_chain(path, on_gpu, spy):
    """Sources that require grad (fp32): one merge per pair through autograd; result and every src gradient equal
    the masked_scatter chain's, bit for bit."""
    labels = audio_in_video_labels()
    audio, image, video = masks_of(labels)
    text = (labels == TEXT).nonzero().flatten()[::7].flip(0)
    indexes = [audio, text, video, image]
    pairs = pairs_of(indexes, dtypes=(F32,), device=DEV if on_gpu else "cpu")
    base = rand((N, H), F32, seed=80)
    weights = rand((N, H), F32, seed=81)

    def grads(merge):
        srcs = [src.detach().clone().requires_grad_(True) for _, src in pairs]
        out = merge(base.clone(), [(index, src) for (index, _), src in zip(pairs, srcs)])
        (out * weights).sum().backward()
        return [out.detach()] + [src.grad for src in srcs]

    def ours(dst, given):
        return mt.merge_modalities_(dst, given, path=path)

    def reference(dst, given):
        for index, src in given:
            index = index.to(DEV)
            if index.dtype == torch.bool:
                dst = dst.masked_scatter(index[:, None], src)
            else:
                dst = dst.index_copy(0, index.long(), src)
        return dst

    got = grads(ours)
    assert len(spy.per_pair) == len(pairs) and spy.items == []
    for k, (a, e) in enumerate(zip(got, grads(reference))):
        assert_same(a, e, "result" if k == 0 else f"grad of src {k - 1}")
