"""The lean call (mmmerge_triton/lean.py) on the CPU: a signature's entry is made once and then serves every
call of it, and each thing the signature does not fix is checked per call, so that a call that hits an entry
gets the general path's result or error. Each test first makes the entry with a good call, then sends the
adversarial one through the same signature."""
import pytest
import torch

import mmmerge_triton as mm
from mmmerge_triton import dispatch, executor, lean

from .conftest import assert_merged, make_mask, reference_merge

H = 16


@pytest.fixture(autouse=True)
def fresh_entries():
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def inputs(n: int, m: int, seed: int = 0, dtype=torch.float32, src_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:m]] = True
    return torch.randn(n, H, dtype=dtype, generator=g), mask, torch.randn(m, H, generator=g).to(src_dtype)


@pytest.fixture
def prepared(monkeypatch):
    """Counts the entries made (lean._prepare calls)."""
    made = []
    real = lean._prepare
    monkeypatch.setattr(lean, "_prepare", lambda *a: made.append(a[0]) or real(*a))
    return made


@pytest.mark.parametrize("path", ["auto", "triton"])
def test_one_entry_serves_a_bucket_of_sizes(prepared, path):
    """N and M vary inside their quarter-octave buckets ([160, 192) and [80, 96)): one entry, every result right."""
    for i, (n, m) in enumerate([(160, 80), (170, 90), (191, 95), (175, 81)]):
        dst, mask, src = inputs(n, m, seed=i)
        before = dst.clone()
        mm.merge_multimodal_embeddings(dst, src, mask, path=path)
        assert_merged(dst, before, mask, src, accumulate=False, path=path)
    assert len(prepared) == 1
    entry = next(iter(lean._entries.values()))
    if path == "auto":  # CPU tensors: index_put
        assert entry.path == "index_put" and entry.launch is None
    else:
        assert entry.path == "triton" and entry.launch.kind == executor.HOST_ROWS


def test_the_entry_runs_what_explain_returns():
    dst, mask, src = inputs(300, 100)
    mm.merge_multimodal_embeddings(dst, src, mask)
    decision = mm.explain(dst, src, mask)
    (entry,) = lean._entries.values()
    assert (entry.path, entry.launch) == (decision.path, None)  # CPU tensors: index_put, no Triton launch


@pytest.mark.parametrize("path", ["auto", "triton"])
def test_a_count_mismatch_on_a_hit_raises_vllms_error_and_writes_nothing(path):
    dst, mask, src = inputs(170, 90)
    mm.merge_multimodal_embeddings(dst, src, mask, path=path)
    dst, mask, _ = inputs(170, 90, seed=1)
    before = dst.clone()
    with pytest.raises(ValueError, match=r"Attempted to assign 89 = 89 multimodal tokens to 90 placeholders"):
        mm.merge_multimodal_embeddings(dst, torch.randn(89, H), mask, path=path)
    with pytest.raises(ValueError, match=r"Attempted to assign 89 multimodal tokens to 90 placeholders"):
        mm.masked_row_scatter_(dst, mask, torch.randn(89, H), path=path)
    assert torch.equal(dst, before)


@pytest.mark.parametrize("path", ["auto", "triton"])
def test_src_inside_dst_on_a_hit_is_refused_as_pytorch_refuses(path):
    """A src that is a view of dst's own rows, with the signature of a good call (same strides, alignment)."""
    big = torch.randn(400, H)
    dst, mask, src = big[:200], make_mask("random50", (200,)), None
    m = int(mask.sum())
    mm.merge_multimodal_embeddings(dst, torch.randn(400, H)[200 : 200 + m], mask, path=path)  # the entry
    before = big.clone()
    with pytest.raises(ValueError, match="shares memory"):
        mm.merge_multimodal_embeddings(dst, big[100 : 100 + m], mask, path=path)
    assert torch.equal(big, before)
    src = big[200 : 200 + m]  # disjoint rows of the same storage: merged
    mm.merge_multimodal_embeddings(dst, src, mask, path=path)
    assert_merged(dst, before[:200], mask, before[200 : 200 + m], accumulate=False, path=path)


def test_a_mask_made_of_dsts_bytes_on_a_hit():
    """A mask viewed from dst's own first row (contiguous, aligned: the signature of the good call before it)."""
    dst, mask, src = inputs(64, 20)
    mm.masked_row_scatter_(dst, mask, src, path="triton")  # the entry
    storage = torch.zeros(64 * H)
    dst2, mask2 = storage.view(64, H), storage.view(torch.uint8)[:64].view(torch.bool)
    storage.view(torch.uint8)[:64] = (torch.arange(64) % 3 == 0).to(torch.uint8) * 7  # bytes 0 or 7
    src2 = torch.randn(int(mask2.sum()), H)
    expected = reference_merge(dst2.clone(), mask2.clone(), src2, False)
    mm.masked_row_scatter_(dst2, mask2, src2, path="triton")
    assert torch.equal(dst2, expected)


def test_gradients_on_a_hit_take_the_general_path():
    dst, mask, src = inputs(170, 90)
    mm.merge_multimodal_embeddings(dst, src, mask)
    leaf = src.clone().requires_grad_()
    base = torch.randn(170, H, requires_grad=True)
    out = mm.masked_row_scatter(base, mask, leaf)
    out.sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(src)) and torch.equal(base.grad, (~mask).float()[:, None].expand(-1, H))
    dst2 = base.detach().clone().requires_grad_()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        mm.merge_multimodal_embeddings(dst2, src, mask)


def test_inference_tensors_on_a_hit():
    with torch.inference_mode():
        dst, mask, src = inputs(170, 90)
        before = dst.clone()
        mm.merge_multimodal_embeddings(dst, src, mask, path="triton")  # written in place under inference mode
        assert_merged(dst, before, mask, src, accumulate=False, path="triton")
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        mm.merge_multimodal_embeddings(dst, src, mask, path="triton")


def test_other_shapes_and_flags_on_a_hit():
    dst, mask, src = inputs(170, 90)
    mm.masked_row_scatter_(dst, mask, src, path="triton")
    with pytest.raises(ValueError, match="expected"):
        mm.masked_row_scatter_(dst, mask[:-1], src, path="triton")  # N differs from the mask's, same buckets
    with pytest.raises(TypeError, match="accumulate must be a bool"):
        mm.masked_row_scatter_(dst, mask, src, accumulate=0, path="triton")  # 0 == False, but not a bool
    with pytest.raises(TypeError, match="check_count must be a bool"):
        mm.masked_row_scatter_(dst, mask, src, check_count=0, path="triton")
    with pytest.raises(ValueError, match="path must be"):
        mm.masked_row_scatter_(dst, mask, src, path="fast")


@pytest.mark.parametrize("accumulate", [False, True])
def test_every_dtype_pair_through_entries(accumulate):
    for i, (d, s) in enumerate([(d, s) for d in (torch.float32, torch.float16, torch.bfloat16)
                                for s in (torch.float32, torch.float16, torch.bfloat16)]):
        for repeat in range(2):  # the second call hits the entry
            dst, mask, src = inputs(100 + repeat, 40 + repeat, seed=10 * i + repeat, dtype=d, src_dtype=s)
            before = dst.clone()
            mm.masked_row_scatter_(dst, mask, src, accumulate=accumulate, path="triton")
            assert_merged(dst, before, mask, src, accumulate=accumulate, path="triton")


def test_clear_cache_drops_the_entries():
    dst, mask, src = inputs(170, 90)
    mm.merge_multimodal_embeddings(dst, src, mask)
    assert lean._entries
    dispatch.clear_cache()
    assert not lean._entries
