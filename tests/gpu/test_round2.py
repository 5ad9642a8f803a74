"""Issue 21 (items 3, 4, 8's list part, 9, 10) and issue 20 §5 (bullet 3) on CUDA, where path="auto" takes the
Triton path: PyTorch on the same device, or vLLM's merge (torch.cat of a list, then index_put), is the oracle.
The CPU forms of these cases: tests/test_round2.py."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (tests/gpu runs on the GPU machine)", allow_module_level=True)

import mmmerge_triton as mt  # noqa: E402

from gpu_helpers import assert_same, dev, rand, random_mask, sync_debug_error  # noqa: E402

DEV = dev()
N, H, M = 257, 64, 40
PATHS = (*mt.PATHS, "auto")
MASK_DEVICES = ("cpu_mask", "gpu_mask")


def _mask(where: str, k: int = M, seed: int = 0) -> torch.Tensor:
    mask = random_mask((N,), k, seed=seed)
    return mask.to(DEV) if where == "gpu_mask" else mask


def _vllm(dst: torch.Tensor, items, mask: torch.Tensor) -> torch.Tensor:
    """vLLM's merge on a copy: torch.cat (a copy, promoting dtypes), then index_put of cat.to(dst.dtype)."""
    out = dst.clone()
    out[mask.to(DEV)] = (items if isinstance(items, torch.Tensor) else torch.cat(items)).to(out.dtype)
    return out


# ---- 21.3: a list's dtype is torch.cat's ---------------------------------------------------------------------------

@pytest.mark.parametrize("where", MASK_DEVICES)
@pytest.mark.parametrize("path", ["auto", "index_put"])
def test_list_with_a_float64_item_merges_as_torch_cat_promotes(path, where):
    """1 + 2^-11 + 2^-40 in float64: PyTorch's .to(float16) of the promoted cat gives 1.0; a float32 list cast
    once by the kernel gave 1.0009765625."""
    dst = torch.zeros(N, H, dtype=torch.float16, device=DEV)
    mask = _mask(where)
    items = [rand((M // 2, H), torch.float32, seed=1),
             torch.full((M - M // 2, H), 1 + 2.0 ** -11 + 2.0 ** -40, dtype=torch.float64, device=DEV)]
    expected = _vllm(dst, items, mask)
    mt.merge_multimodal_embeddings(dst, items, mask, path=path)
    assert_same(dst, expected)


def test_list_with_a_float64_item_is_refused_by_path_triton():
    dst = torch.zeros(N, H, dtype=torch.float16, device=DEV)
    items = [rand((1, H), torch.float32), torch.ones(M - 1, H, dtype=torch.float64, device=DEV)]
    with pytest.raises(ValueError, match=r"float64"):
        mt.merge_multimodal_embeddings(dst, items, _mask("cpu_mask"), path="triton")
    assert not dst.any()


@pytest.mark.parametrize("where", MASK_DEVICES)
@pytest.mark.parametrize("path", ["auto", "triton"])
def test_list_of_float16_and_bfloat16_items_merges_through_float32(path, where):
    dst = rand((N, H), torch.bfloat16, seed=3)
    mask = _mask(where)
    items = [rand((M // 2, H), torch.float16, seed=4), rand((M - M // 2, H), torch.bfloat16, seed=5)]
    expected = _vllm(dst, items, mask)
    mt.merge_multimodal_embeddings(dst, items, mask, path=path)
    assert_same(dst, expected)


# ---- 21.4: a count mismatch raises on every form of the source (a device mask: with check_count) ----------------

COUNT_SOURCES = {
    "tensor": (lambda: rand((2, H), torch.float32), "2 = 2"),
    "list": (lambda: [rand((1, H), torch.float32), rand((1, H), torch.float32, seed=1)], "1 + 1 = 2"),
    "nested_list": (lambda: [[rand((1, H), torch.float32)], [rand((1, H), torch.float32, seed=1)]], "1 + 1 = 2"),
    "empty_list": (lambda: [], "0"),
    "nested_empty_list": (lambda: [[]], "0"),
}


@pytest.mark.parametrize("source", COUNT_SOURCES)
@pytest.mark.parametrize("where", MASK_DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_count_mismatch_raises_on_every_form_of_the_source(path, where, source):
    make, count = COUNT_SOURCES[source]
    dst = rand((N, H), torch.float32, seed=2)
    before = dst.clone()
    with pytest.raises(ValueError) as info:
        mt.merge_multimodal_embeddings(dst, make(), _mask(where, k=3), path=path, check_count=where == "gpu_mask")
    assert str(info.value) == f"Attempted to assign {count} multimodal tokens to 3 placeholders"
    assert_same(dst, before)


@pytest.mark.parametrize("empty", [[], [[]]], ids=["empty_list", "nested_empty_list"])
def test_empty_source_with_a_device_mask_writes_nothing_and_never_syncs(empty):
    """The README's rule for a device mask without check_count: no sync; min(K, 0) = 0 rows move."""
    dst = rand((N, H), torch.float32, seed=2)
    mask = _mask("gpu_mask", k=3)
    before = dst.clone()
    mt.merge_multimodal_embeddings(dst, empty, mask)  # a first call: tables, kernels
    with sync_debug_error():
        mt.merge_multimodal_embeddings(dst, empty, mask)
    assert_same(dst, before)


# ---- 21.8 (list part): a one-item list overlapping dst merges as vLLM's cat-first does ------------------------------

@pytest.mark.parametrize("form", ["list", "nested"])
@pytest.mark.parametrize("where", MASK_DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_one_item_list_overlapping_dst_merges_as_vllm(path, where, form):
    dst = rand((N, H), torch.float16, seed=6)
    mask = _mask(where)
    item = dst[N - M:]  # rows the merge may overwrite
    wrap = (lambda x: [x]) if form == "list" else (lambda x: [[x]])
    expected = _vllm(dst, [item.clone()], mask)
    mt.merge_multimodal_embeddings(dst, wrap(item), mask, path=path)
    assert_same(dst, expected)


# ---- 21.9: disjoint views of one buffer merge; views sharing bytes are refused ------------------------------------

@pytest.mark.parametrize("where", MASK_DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_column_halves_merge_as_pytorch(path, where):
    buf = rand((N, 2 * H), torch.bfloat16, seed=7)
    mask = _mask(where)
    expected = buf.clone()
    expected[:, :H][mask.to(DEV)] = expected[:M, H:]
    mt.masked_row_scatter_(buf[:, :H], mask, buf[:M, H:], path=path)
    assert_same(buf, expected)


@pytest.mark.parametrize("path", PATHS)
def test_straddling_columns_are_refused_before_writing(path):
    buf = rand((N, 2 * H), torch.bfloat16, seed=7)
    before = buf.clone()
    with pytest.raises(ValueError, match=r"shares memory with .*Clone"):
        mt.masked_row_scatter_(buf[:, :H], _mask("cpu_mask"), buf[:M, H // 2:H // 2 + H], path=path)
    assert_same(buf, before)


# ---- 21.10: in place with gradients, a source sharing dst's memory is refused ------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_in_place_with_gradients_refuses_a_source_sharing_dst(path):
    base = rand((N, H), torch.float32, seed=8).requires_grad_()
    dst = base * 1
    before = dst.detach().clone()
    with pytest.raises(ValueError, match=r"shares memory with .*Clone"):
        mt.masked_row_scatter_(dst, _mask("cpu_mask"), dst[N - M:], path=path)
    assert_same(dst.detach(), before)


# ---- 20.5, bullet 3: the count error reads the same through a subclass (the registered ops) ----------------------

class Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("where", MASK_DEVICES)
def test_count_error_reads_the_same_through_a_subclass(where):
    dst = rand((N, H), torch.float32, seed=9)
    items = [rand((1, H), torch.float32), rand((1, H), torch.float32, seed=1)]
    mask = _mask(where, k=3)
    check_count = where == "gpu_mask"
    texts = []
    for d in (dst, dst.as_subclass(Subclass)):
        with pytest.raises(ValueError) as info:
            mt.merge_multimodal_embeddings(d, items, mask, check_count=check_count)
        texts.append((info.type, str(info.value)))
    assert texts[0] == texts[1]
    assert texts[0][1] == "Attempted to assign 1 + 1 = 2 multimodal tokens to 3 placeholders"
