"""merge_modalities_: several (index, src) pairs merged in one launch, against PyTorch's sequential chain on a
clone (one ``masked_scatter_(mask[..., None], src.to(dst.dtype))`` per mask pair, one ``index_copy_(0, positions,
src.to(dst.dtype))`` per positions pair, in list order; ``index_put_(..., accumulate=True)`` with accumulate), bit
for bit. Layouts of the omni models (notes/omni.md): Qwen2.5-Omni's audio, image, video blocks and its
use_audio_in_video chunks, Qwen3-Omni's token-by-token alternation, positions mixed with masks, sources read in
place or concatenated, empty sources, every row taken, [B, S, H] destinations. Every call runs twice (the package
memoizes decisions per input signature): outcomes may not change. Errors are raised before anything is written.

The Triton path runs under the interpreter, which rounds a cast into bfloat16 toward zero (conftest.py): where it
runs, the reference rounds the same way (``_Reference.truncating``), so the comparison stays bit for bit. The
device-index semantics (no sync, the last pair naming a row wins, a mask's first min(K, M) rows) are checked on the
map builder itself (modalities.device_map and executor.run_modalities, as the public call runs them on a GPU);
tests/gpu/test_modalities.py checks them through the public call.
"""
from __future__ import annotations

import re
import sys
from typing import Callable, NamedTuple

import pytest
import torch

import mmmerge_triton as mm
from mmmerge_triton import executor, items, modalities
from mmmerge_triton.dispatch import bucket, decide_positions

from .conftest import DTYPE_PAIR_IDS, DTYPE_PAIRS, INTERPRETED, assert_bits_equal, truncate_to_bf16

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="runs the Triton path on CPU tensors: needs the interpreter")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
N, H = 48, 24
TRITON_PATHS = ("triton", "auto_triton")  # auto_triton: path="auto" made to choose Triton, as the tables do on a GPU
TORCH_PATHS = ("auto", "index_put", "index_copy", "masked_scatter")


# ---- inputs and the reference -----------------------------------------------------------------------------------

def rnd(*shape, dtype=F32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def mask_at(rows, shape=(N,)) -> torch.Tensor:
    """A bool mask of ``shape`` whose flat ``rows`` are true."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[torch.as_tensor(list(rows), dtype=torch.long)] = True
    return mask


def count(index: torch.Tensor) -> int:
    return int(index.sum()) if index.dtype == torch.bool else index.shape[0]


def pairs_of(indexes, dtypes=(F32,), seed: int = 10) -> list:
    """(index, src) per index: src [rows named, H] of dtypes[k % len(dtypes)], seeded per pair."""
    return [(index, rnd(count(index), H, dtype=dtypes[k % len(dtypes)], seed=seed + k))
            for k, index in enumerate(indexes)]


class _Reference(NamedTuple):
    """The sequential PyTorch chain. ``truncating``: round casts and sums into bfloat16 toward zero, as the
    interpreted Triton path does (exact for the PyTorch paths and on a GPU: tests/gpu)."""

    truncating: bool = False

    def value(self, src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.truncating and dtype == BF16 and src.dtype != BF16:
            return truncate_to_bf16(src)
        return src.to(dtype)

    def __call__(self, dst: torch.Tensor, pairs, accumulate: bool = False) -> torch.Tensor:
        out = dst.detach().clone()
        for index, src in pairs:
            value = self.value(src.detach(), out.dtype)
            if accumulate and self.truncating and out.dtype == BF16:
                out[index] = truncate_to_bf16(out[index].float() + value.float())
            elif accumulate:
                out.index_put_((index,), value, accumulate=True)
            elif index.dtype == torch.bool:
                out.masked_scatter_(index[..., None], value)
            else:
                out.index_copy_(0, index.long(), value)
        return out


def reference_for(path: str) -> _Reference:
    return _Reference(truncating=path in TRITON_PATHS)


# ---- layouts ------------------------------------------------------------------------------------------------------

def token_masks(tokens: str, shape=(N,)) -> dict[str, torch.Tensor]:
    """Per modality letter (A audio, I image, V video), the mask of its tokens in ``tokens`` ('.' text), padded
    with text to shape's rows."""
    n = 1
    for s in shape:
        n *= s
    tokens = tokens.ljust(n, ".")
    assert len(tokens) == n, tokens
    return {k: mask_at([i for i, t in enumerate(tokens) if t == k], shape) for k in "AIV"}


def _qwen25_omni():  # audio, image, video blocks: the thinker's three merges, in its order
    m = token_masks("..AAAAAA...IIII..VVVVVVVV.....")
    return pairs_of([m["A"], m["I"], m["V"]])


def _audio_in_video_chunks():  # Qwen2.5-Omni use_audio_in_video: video and audio alternate in 2 s chunks
    m = token_masks(".III..VVVVAAAAVVVVAAAAVVAA..")
    return pairs_of([m["A"], m["I"], m["V"]])


def _token_alternation():  # Qwen3-Omni: video and audio tokens interleaved one by one by timestamp
    m = token_masks("..VAVAVVAVAAVAVV..AVAV.")
    return pairs_of([m["V"], m["A"]])


def _positions_between_masks():
    m = token_masks(".AAA.......III....VVVV")
    positions = torch.tensor([9, 5, 30, 6, 47, 40])  # unsorted int64
    return pairs_of([m["A"], positions, m["V"]])


def _int32_positions_first():
    return pairs_of([torch.tensor([3, 0, 44, 17], dtype=torch.int32), mask_at([5, 6, 7, 20, 21])])


def _empty_sources():  # M_k = 0: an empty mask, an empty positions list, around two real pairs
    return pairs_of([mask_at([]), mask_at([2, 3, 30]), torch.zeros(0, dtype=torch.long), mask_at([40, 41])])


def _all_rows():  # three masks that partition every row of dst
    labels = torch.arange(N) % 3
    return pairs_of([labels == 0, labels == 1, labels == 2])


def _batched():  # dst [B, S, H] with [B, S] masks (HF's get_placeholder_mask, squeezed)
    m = token_masks("..AAAA.VVAAVV..IIII..VV.AAVV...III..VVVV..AA....", shape=(2, N // 2))
    return pairs_of([m["A"], m["I"], m["V"]])


def _shared_buffer():  # slices of one buffer with a row stride of H + 8, one of them before the first item
    buffer = rnd(20, H + 8, seed=4)
    m = token_masks("...AAAAA....IIII.....VVV")
    return [(m["A"], buffer[10:15, :H]), (m["I"], buffer[2:6, 3: H + 3]), (m["V"], buffer[16:19, 8:])]


def _column_strided_src():  # one source with column stride != 1: the sources share no layout, concatenated
    m = token_masks("..AAAA....VVVVV...")
    strided = rnd(H, 5, seed=7).t()
    return [(m["A"], rnd(4, H, seed=8)), (m["V"], strided)]


def _mixed_src_dtypes():  # sources of three dtypes: concatenated (torch.cat promotes them; the cast is exact)
    m = token_masks(".AAA..III...VVVV.")
    return pairs_of([m["A"], m["I"], m["V"]], dtypes=(F32, F16, BF16))


def _negative_view_src():  # a lazily negated source (the negative bit): concatenated, its bit resolved
    m = token_masks("..AAA....VVVV")
    return [(m["A"], rnd(3, H, seed=1)), (m["V"], torch._neg_view(rnd(4, H, seed=2)))]


class Layout(NamedTuple):
    make: Callable[[], list]
    shared: bool  # whether the sources share a row layout (read in place) rather than being concatenated
    dst_shape: tuple = (N, H)


LAYOUTS = {
    "one_pair": Layout(lambda: pairs_of([mask_at([1, 4, 9, 16, 25, 36])]), True),
    "image_then_video": Layout(lambda: pairs_of([mask_at(range(3, 10)), mask_at(range(20, 32))]), True),
    "qwen25_omni_audio_image_video": Layout(_qwen25_omni, True),
    "audio_in_video_chunks": Layout(_audio_in_video_chunks, True),
    "token_alternation": Layout(_token_alternation, True),
    "positions_between_masks": Layout(_positions_between_masks, True),
    "int32_positions_first": Layout(_int32_positions_first, True),
    "empty_sources": Layout(_empty_sources, True),
    "all_rows": Layout(_all_rows, True),
    "batched_bsh": Layout(_batched, True, (2, N // 2, H)),
    "shared_buffer": Layout(_shared_buffer, True),
    "column_strided_src": Layout(_column_strided_src, False),
    "mixed_src_dtypes": Layout(_mixed_src_dtypes, False),
    "negative_view_src": Layout(_negative_view_src, False),
}


def has_positions(pairs) -> bool:
    return any(index.dtype != torch.bool for index, _ in pairs)


# ---- routes and spies ---------------------------------------------------------------------------------------------

class Spy(NamedTuple):
    """Calls seen: items' multi_row_copy launches, executor.row_copy launches (a concatenated merge, or the per-pair
    route's), and the per-pair route (masked_row_scatter_ / indexed_row_scatter_ from modalities)."""

    items: list
    row_copy: list
    per_pair: list

    def launches(self) -> int:
        return len(self.items) + len(self.row_copy)

    def clear(self) -> None:
        for calls in self:
            calls.clear()


@pytest.fixture
def spy(monkeypatch) -> Spy:
    seen = Spy([], [], [])

    def wrap(module, name, calls):
        original = getattr(module, name)

        def spied(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, spied)

    wrap(items, "_launch", seen.items)
    wrap(executor, "row_copy", seen.row_copy)
    caller = sys.modules[mm.merge_modalities_.__module__]  # the module whose per-pair merges the call finds
    wrap(caller, "masked_row_scatter_", seen.per_pair)
    wrap(caller, "indexed_row_scatter_", seen.per_pair)
    return seen


def run_twice(dst: torch.Tensor, pairs, spy: Spy | None = None, **kwargs) -> list[torch.Tensor]:
    """merge_modalities_ on two fresh clones of dst (the second call meets the decision the first memoized):
    returns both results, each checked to be the dst passed. With ``spy``, the calls of each run must match."""
    outs, seen = [], []
    for _ in range(2):
        out = dst.clone()
        if spy is not None:
            spy.clear()
        assert mm.merge_modalities_(out, pairs, **kwargs) is out
        outs.append(out)
        if spy is not None:
            seen.append((list(spy.items), list(spy.row_copy), list(spy.per_pair)))
    if spy is not None:
        assert seen[0] == seen[1], f"the second call ran otherwise: {seen}"
    return outs


# ---- results ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("path", TRITON_PATHS + TORCH_PATHS)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_sequential_chain(name, path, accumulate, route, spy):
    layout = LAYOUTS[name]
    pairs = layout.make()
    if path == "masked_scatter" and has_positions(pairs):
        pytest.skip("masked_scatter takes masks (its refusal of positions: test_errors_raise_before_writing)")
    if accumulate and path == "auto_triton":
        pytest.skip("accumulate on the Triton path is covered by path='triton' (interpreter time)")
    dst = rnd(*layout.dst_shape, dtype=BF16 if name == "mixed_src_dtypes" else F32, seed=3)
    expected = reference_for(path)(dst, pairs, accumulate)
    for out in run_twice(dst, pairs, spy, accumulate=accumulate, path=route(path)):
        assert_bits_equal(out, expected, f"{name} by {path}")
    if path in TRITON_PATHS:
        assert spy.per_pair == [], "the one-launch route must not fall back to one merge per pair"
        assert spy.launches() == 1, f"one launch for {len(pairs)} pairs, saw {spy}"
        assert len(spy.items) == int(layout.shared), "sources read in place exactly when they share a row layout"
    else:
        assert spy.launches() == 0 and len(spy.per_pair) == len(pairs)


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=DTYPE_PAIR_IDS)
def test_every_dtype_pair(pair, accumulate, route, spy):
    src_dtype, dst_dtype = pair
    m = token_masks(".AA..VAVAV...III")
    pairs = pairs_of([m["A"], torch.tensor([20, 16, 30]), m["V"], m["I"]], dtypes=(src_dtype,))
    dst = rnd(N, H, dtype=dst_dtype, seed=5)
    for path in ("triton", "index_put"):
        expected = reference_for(path)(dst, pairs, accumulate)
        for out in run_twice(dst, pairs, accumulate=accumulate, path=route(path)):
            assert_bits_equal(out, expected, f"{pair} by {path}")
    assert len(spy.items) == 2  # the two triton calls: one launch each, sources read in place


@pytest.mark.parametrize("dst_dtype", [F32, F16, BF16])
def test_sources_of_three_dtypes_in_one_call(dst_dtype, route, spy):
    m = token_masks("VAVAVA..III..AAV")
    pairs = [(m["V"], rnd(4, H, dtype=BF16, seed=1)), (m["A"], rnd(5, H, dtype=F16, seed=2)),
             (m["I"], rnd(3, H, dtype=F32, seed=3))]
    dst = rnd(N, H, dtype=dst_dtype, seed=4)
    for accumulate in (False, True):
        expected = reference_for("triton")(dst, pairs, accumulate)
        for out in run_twice(dst, pairs, accumulate=accumulate, path=route("triton")):
            assert_bits_equal(out, expected, f"into {dst_dtype}")
    assert len(spy.row_copy) == 4 and spy.items == []  # concatenated: one row_copy per call


def test_row_strided_dst_leaves_the_columns_past_h_alone(route):
    """dst [N, H] a view of a wider buffer: only dst's columns of the named rows change."""
    buffer = rnd(N, H + 5, seed=6)
    pairs = _audio_in_video_chunks()
    expected = buffer.clone()
    expected[:, :H] = _Reference(truncating=True)(buffer[:, :H], pairs)
    for path in ("triton", "index_put"):
        out = buffer.clone()
        mm.merge_modalities_(out[:, :H], pairs, path=route(path))
        assert_bits_equal(out, expected, path)


def test_float64_dst_takes_the_pytorch_paths(spy):
    dst = rnd(N, H, dtype=torch.float64, seed=1)
    pairs = pairs_of([mask_at([1, 2, 3]), torch.tensor([10, 9]), mask_at([30, 40])], dtypes=(torch.float64, F32))
    for out in run_twice(dst, pairs, spy):
        assert_bits_equal(out, _Reference()(dst, pairs))
    assert spy.launches() == 0 and len(spy.per_pair) == 3


def test_no_pairs_writes_nothing(spy):
    dst = rnd(N, H, seed=1)
    for pairs in ([], ()):
        for out in run_twice(dst, pairs, path="triton"):
            assert_bits_equal(out, dst)
    assert spy.launches() == 0 and spy.per_pair == []


def test_only_empty_sources_launch_nothing(spy):
    dst = rnd(N, H, seed=1)
    pairs = pairs_of([mask_at([]), torch.zeros(0, dtype=torch.int32), mask_at([])])
    for out in run_twice(dst, pairs, path="triton"):
        assert_bits_equal(out, dst)
    assert spy.launches() == 0


def test_pairs_as_lists_and_a_tuple_of_pairs():
    pairs = _qwen25_omni()
    dst = rnd(N, H, seed=2)
    expected = _Reference(truncating=True)(dst, pairs)
    for given in ([list(p) for p in pairs], tuple(pairs)):
        for out in run_twice(dst, given, path="triton"):
            assert_bits_equal(out, expected)


def test_check_count_with_cpu_indexes_changes_nothing(route, spy):
    """CPU indexes are always checked on the host: check_count=True gives the same result, by one launch."""
    pairs = _positions_between_masks()
    dst = rnd(N, H, dtype=F16, seed=3)
    for out in run_twice(dst, pairs, spy, path=route("triton"), check_count=True):
        assert_bits_equal(out, _Reference(truncating=True)(dst, pairs))
    assert spy.launches() == 1 and spy.per_pair == []


# ---- errors -------------------------------------------------------------------------------------------------------

GOOD = token_masks("..AAA...III...VVVV")


def _good_pairs():
    return pairs_of([GOOD["A"], GOOD["I"], GOOD["V"]])


def _replace(k: int, index=None, src=None) -> Callable[[], list]:
    """The good pairs with pair k's index and/or src replaced (a function of the good pair's src)."""
    def make():
        pairs = _good_pairs()
        old_index, old_src = pairs[k]
        pairs[k] = (old_index if index is None else index,
                    old_src if src is None else (src(old_src) if callable(src) else src))
        return pairs
    return make


class Bad(NamedTuple):
    make: Callable[[], object]  # the pairs argument
    error: type
    match: str
    kwargs: dict = {}
    dst_shape: tuple = (N, H)


BAD = {
    "overlapping_masks": Bad(_replace(1, index=GOOD["I"] | mask_at([2]), src=rnd(4, H)), ValueError,
                             r"pairs overlap: they name row 2 more than once"),
    "mask_and_positions_overlap": Bad(_replace(2, index=torch.tensor([30, 8, 31, 32])), ValueError,
                                      r"pairs overlap: they name row 8"),
    "identical_masks": Bad(lambda: pairs_of([GOOD["I"], GOOD["I"]]), ValueError, "pairs overlap"),
    "count_short_src": Bad(_replace(1, src=lambda s: s[:2]), ValueError,
                           r"^pairs\[1\]: Attempted to assign 2 multimodal tokens to 3 placeholders"),
    "count_long_src": Bad(_replace(1, src=rnd(5, H)), ValueError,
                          r"^pairs\[1\]: Attempted to assign 5 multimodal tokens to 3 placeholders"),
    "position_past_n": Bad(_replace(1, index=torch.tensor([20, N, 21])), IndexError,
                           r"pairs\[1\] positions\[1\] = 48 is out of range"),
    "position_negative": Bad(_replace(2, index=torch.tensor([30, 31, -1, 33], dtype=torch.int32)), IndexError,
                             r"pairs\[2\] positions\[2\] = -1 is out of range"),
    "position_repeated": Bad(_replace(1, index=torch.tensor([20, 21, 20])), ValueError, "pairs.* repeats row 20"),
    "positions_count": Bad(_replace(1, index=torch.tensor([20, 21])), ValueError,
                           r"pairs\[1\] positions has 2 entries; its src has 3 rows"),
    "positions_2d": Bad(_replace(1, index=torch.tensor([[20, 21, 22]])), ValueError,
                        r"pairs\[1\] positions must have shape \[M\]"),
    "positions_into_bsh": Bad(lambda: [(torch.tensor([0, 1]), rnd(2, H))], ValueError,
                              r"dst must have shape \[N, H\] to be merged at row positions", dst_shape=(2, 24, H)),
    "float_positions": Bad(_replace(1, index=torch.tensor([20.0, 21.0, 22.0])), TypeError,
                           r"pairs\[1\] positions must be an int32 or int64"),
    "uint8_mask": Bad(_replace(0, index=GOOD["A"].to(torch.uint8)), TypeError, r"pairs\[0\] positions must be an"),
    "mask_shape": Bad(_replace(2, index=GOOD["V"][:-1]), ValueError, r"pairs\[2\] mask has shape \(47,\)"),
    "mask_hf_shape_n_1": Bad(_replace(2, index=GOOD["V"][:, None]), ValueError, r"pairs\[2\] mask has shape"),
    "src_hidden": Bad(_replace(1, src=rnd(3, H + 1)), ValueError, r"pairs\[1\] src has hidden size 25"),
    "src_1d": Bad(_replace(1, src=rnd(3 * H)), ValueError, r"pairs\[1\] src must have shape \[M, H\]"),
    "src_3d": Bad(_replace(1, src=rnd(1, 3, H)), ValueError, r"pairs\[1\] src must have shape \[M, H\]"),
    "src_int": Bad(_replace(1, src=torch.zeros(3, H, dtype=torch.int32)), TypeError, r"pairs\[1\] src must be"),
    "index_not_a_tensor": Bad(_replace(1, index=[8, 9, 10]), TypeError, r"pairs\[1\] index must be a torch.Tensor"),
    "src_not_a_tensor": Bad(_replace(1, src=[[0.0] * H] * 3), TypeError, r"pairs\[1\] src must be a torch.Tensor"),
    "pairs_none": Bad(lambda: None, TypeError, "pairs must be a list of"),
    "pairs_a_tensor": Bad(lambda: rnd(3, H), TypeError, "pairs must be a list of"),
    "pairs_a_string": Bad(lambda: "pairs", TypeError, "pairs must be a list of"),
    "pairs_a_generator": Bad(lambda: (p for p in _good_pairs()), TypeError, "pairs must be a list of"),
    "pairs_a_dict": Bad(lambda: dict(enumerate(_good_pairs())), TypeError, "pairs must be a list of"),
    "pair_of_one": Bad(lambda: _good_pairs()[:1] + [(GOOD["I"],)], TypeError, r"pairs\[1\] must be an \(index, src\)"),
    "pair_of_three": Bad(lambda: [p + (None,) if k == 2 else p for k, p in enumerate(_good_pairs())], TypeError,
                         r"pairs\[2\] must be an \(index, src\) pair"),
    "pair_a_tensor": Bad(lambda: [_good_pairs()[0], rnd(2, H)], TypeError, r"pairs\[1\] must be an \(index, src\)"),
    "path_unknown": Bad(_good_pairs, ValueError, "path must be 'auto' or one of", {"path": "cuda"}),
    "path_not_a_str": Bad(_good_pairs, TypeError, "path must be a str", {"path": 1}),
    "masked_scatter_positions": Bad(_replace(1, index=torch.tensor([8, 9, 10])), ValueError,
                                    r"pairs\[1\]: path='masked_scatter' takes masks", {"path": "masked_scatter"}),
    "dst_int": Bad(_good_pairs, TypeError, "dst must be float64, float32, float16 or bfloat16"),
}


def _bad_dst(name: str, bad: Bad) -> torch.Tensor:
    dst = rnd(*bad.dst_shape, seed=9)
    return dst.to(torch.int32) if name == "dst_int" else dst


def _outcome(call) -> tuple:
    try:
        call()
    except Exception as error:  # noqa: BLE001 -- the outcome compared, whatever it is
        return type(error), str(error)
    return None, None


@pytest.mark.parametrize("path", ["auto", "triton", "index_put", "index_copy"])
@pytest.mark.parametrize("name", list(BAD))
def test_errors_raise_before_writing(name, path, route):
    """Each bad input raises its error, naming the pair, with dst's bytes unchanged; twice, with a good call of
    the same shapes between (its decision is then memoized): the same error both times."""
    bad = BAD[name]
    kwargs = {"path": route(path), **bad.kwargs}
    dst = _bad_dst(name, bad)
    outcomes = []
    for attempt in range(2):
        out = dst.clone()
        pairs = bad.make()
        outcome = _outcome(lambda: mm.merge_modalities_(out, pairs, **kwargs))
        outcomes.append(outcome)
        assert outcome[0] is bad.error, f"{name}: got {outcome}"
        assert re.search(bad.match, outcome[1]), f"{name}: {outcome[1]!r} does not match {bad.match!r}"
        assert_bits_equal(out, dst, f"{name}: dst after the error")
        if attempt == 0 and bad.dst_shape == (N, H) and name != "dst_int" and "path" not in bad.kwargs:
            good = dst.clone()
            mm.merge_modalities_(good, _good_pairs(), path=kwargs["path"])
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("path", ["triton", "index_put"])
def test_check_count_raises_as_without_it(path, route):
    bad = BAD["count_short_src"]
    dst = rnd(N, H, seed=1)
    with pytest.raises(ValueError, match=r"^pairs\[1\]: Attempted to assign 2"):
        mm.merge_modalities_(dst, bad.make(), path=route(path), check_count=True)
    assert_bits_equal(dst, rnd(N, H, seed=1))


# Flags of the wrong type: masked_row_scatter_ (and so the per-pair route) raises TypeError; the one launch must too.
FLAGS = [pytest.param("accumulate", 1, id="accumulate_int"), pytest.param("accumulate", "yes", id="accumulate_str"),
         pytest.param("check_count", "yes", id="check_count_str")]


@pytest.mark.parametrize("flag,value", FLAGS)
@pytest.mark.parametrize("path", [
    "index_put",
    "triton",
])
def test_flags_must_be_bools(path, flag, value, route):
    dst = rnd(N, H, seed=1)
    for _ in range(2):
        out = dst.clone()
        with pytest.raises(TypeError, match=f"{flag} must be a bool"):
            mm.merge_modalities_(out, _good_pairs(), path=route(path), **{flag: value})
        assert_bits_equal(out, dst)


@pytest.mark.parametrize("order", [
    "aliased_pair_first",
    "aliased_pair_last",
])
@pytest.mark.parametrize("path", ["triton", "index_put"])
def test_src_sharing_dst_memory_raises_before_writing(path, order, route):
    """masked_row_scatter_ refuses a src that shares dst's memory in dst's dtype: so must this call, with nothing
    written, wherever that pair sits in the list."""
    dst = rnd(N, H, seed=1)
    out = dst.clone()
    pairs = [(mask_at([0, 1, 2]), rnd(3, H, seed=2)), (mask_at([20, 21, 22]), out[40:43])]
    if order == "aliased_pair_first":
        pairs.reverse()
    for _ in range(2):
        with pytest.raises(ValueError, match="shares memory with dst"):
            mm.merge_modalities_(out, pairs, path=route(path))
        assert_bits_equal(out, dst)


@pytest.mark.parametrize("path", [
    "auto",
    "index_put",
    "triton",
])
def test_dst_whose_rows_do_not_flatten(path, route):
    """A [B, S, H] dst that is a transposed view: merged (PyTorch paths) or refused (ValueError naming the
    layout, nothing written); never silently left alone."""
    dst = rnd(N // 2, 2, H, seed=1).transpose(0, 1)
    before = dst.clone()
    pairs = _batched()
    try:
        mm.merge_modalities_(dst, pairs, path=route(path))
    except ValueError as error:
        assert "flatten" in str(error)
        assert_bits_equal(dst, before)
        return
    assert_bits_equal(dst, _Reference()(before, pairs))


# ---- gradients ----------------------------------------------------------------------------------------------------

def _grad_case(dst_requires_grad: bool, bsh: bool):
    if bsh:
        pairs = _batched()
        base = rnd(2, N // 2, H, seed=20)
    else:
        pairs = _positions_between_masks()
        base = rnd(N, H, seed=20)
    weights = rnd(*base.shape, seed=21)
    return base.requires_grad_(dst_requires_grad), pairs, weights


def _grads(base, pairs, weights, merge, accumulate) -> list:
    srcs = [src.detach().clone().requires_grad_(True) for _, src in pairs]
    dst = base.clone() if base.requires_grad else base.detach().clone()  # a non-leaf where dst needs grad
    out = merge(dst, [(index, src) for (index, _), src in zip(pairs, srcs)], accumulate)
    (out * weights).sum().backward()
    return [out.detach()] + [src.grad for src in srcs] + ([base.grad] if base.requires_grad else [])


def _chain(dst, pairs, accumulate):
    for index, src in pairs:
        if accumulate:
            dst = dst.index_put((index,), src, accumulate=True)
        elif index.dtype == torch.bool:
            dst = dst.masked_scatter(index[..., None], src)
        else:
            dst = dst.index_copy(0, index.long(), src)
    return dst


@pytest.mark.parametrize("accumulate", [False, True], ids=["copy", "add"])
@pytest.mark.parametrize("dst_requires_grad", [False, True], ids=["src_grad", "dst_and_src_grad"])
@pytest.mark.parametrize("bsh", [False, True], ids=["positions_2d", "bsh"])
@pytest.mark.parametrize("path", ["auto", "triton", "index_put"])
def test_gradients_match_the_masked_scatter_chain(path, bsh, dst_requires_grad, accumulate, route, spy):
    """Sources that require grad: one merge per pair through masked_row_scatter_ / indexed_row_scatter_ (autograd),
    whose src (and dst) gradients equal the chain's, bit for bit (fp32)."""
    if path == "triton" and dst_requires_grad and accumulate:
        pytest.skip("interpreter time: the Triton path's gradients are covered by the other triton cases")
    base, pairs, weights = _grad_case(dst_requires_grad, bsh)
    path = route(path)

    def ours(dst, pairs, accumulate):
        assert mm.merge_modalities_(dst, pairs, accumulate=accumulate, path=path) is dst
        return dst

    got = _grads(base, pairs, weights, ours, accumulate)
    if base.grad is not None:
        base.grad = None
    expected = _grads(base, pairs, weights, _chain, accumulate)
    assert len(got) == len(expected)
    for k, (a, e) in enumerate(zip(got, expected)):
        assert_bits_equal(a, e, "result" if k == 0 else f"grad {k}")
    assert len(spy.per_pair) == len(pairs) and spy.items == []


def test_gradients_with_overlapping_cpu_masks_raise_before_writing():
    dst = rnd(N, H, seed=1)
    src = rnd(3, H, seed=2).requires_grad_(True)
    out = dst.clone()
    for _ in range(2):
        with pytest.raises(ValueError, match="pairs overlap"):
            mm.merge_modalities_(out, [(mask_at([1, 2, 3]), src), (mask_at([3, 4, 5]), src * 2)])
        assert_bits_equal(out, dst)
        assert not out.requires_grad


# ---- device indexes: the map builder (modalities.device_map) and its launch (executor.run_modalities) ----------

def _device_merge(dst: torch.Tensor, pairs, accumulate: bool = False) -> torch.Tensor:
    """What merge_modalities_ runs for indexes on dst's device (here CPU tensors under the interpreter): the map,
    built without a sync, then one bounded launch. Returns the map."""
    dst2d = dst.view(-1, dst.shape[-1])
    indexes, srcs = [i for i, _ in pairs], [s for _, s in pairs]
    rows = modalities.device_map(dst2d.shape[0], indexes, srcs)
    m = sum(s.shape[0] for s in srcs)
    config = decide_positions(dst2d, indexes[0], srcs[0].dtype, bucket(m), "triton").config
    executor.run_modalities(config, dst2d, rows, srcs, accumulate)
    return rows


def _expected_map(n: int, pairs) -> list[int]:
    """The map the spec describes: each mask's first min(K, M_k) true rows (then -1), each position (-1 out of
    [0, n)); an entry whose row a later pair names again: -1."""
    parts = []
    for index, src in pairs:
        m = src.shape[0]
        if index.dtype == torch.bool:
            rows = index.reshape(-1).nonzero().flatten().tolist()[:m]
            parts.append(rows + [-1] * (m - len(rows)))
        else:
            parts.append([p if 0 <= p < n else -1 for p in index.tolist()])
    for k in range(len(parts)):
        later = {r for part in parts[k + 1:] for r in part if r >= 0}
        parts[k] = [-1 if r in later else r for r in parts[k]]
    return [r for part in parts for r in part]


def _effective(n: int, index: torch.Tensor, src: torch.Tensor):
    """The pair as the sequential chain sees what a device index merges: a mask's first min(K, M) true rows and
    src's first min(K, M) rows; positions in [0, n) and their rows."""
    if index.dtype == torch.bool:
        k = min(int(index.sum()), src.shape[0])
        flat = index.reshape(-1).clone()
        flat[flat.nonzero().flatten()[k:]] = False
        return flat.view(index.shape), src[:k]
    inside = (index >= 0) & (index < n)
    return index[inside], src[inside]


DEVICE_CASES = {
    # The last pair that names a row wins, as after one masked_scatter_ per pair in list order.
    "overlapping_masks_last_wins": lambda: pairs_of([mask_at(range(0, 20)), mask_at(range(10, 30)),
                                                     mask_at([5, 25, 40])]),
    "identical_masks": lambda: pairs_of([mask_at([3, 7, 9]), mask_at([3, 7, 9])]),
    "positions_then_overlapping_mask": lambda: pairs_of([torch.tensor([12, 3, 30, 4]), mask_at([3, 4, 5])]),
    "mask_then_overlapping_positions": lambda: pairs_of([mask_at([3, 4, 5]), torch.tensor([4, 12], dtype=torch.int32)]),
    # A mask with fewer true rows than its src: the first K rows move, the rest are unused.
    "mask_fewer_rows_than_src": lambda: [(mask_at([2, 8, 9]), rnd(6, H, seed=1)), (mask_at([20, 21]), rnd(2, H))],
    # More true rows than src rows: the first M true rows take them, later true rows keep their values, and an
    # earlier pair's write of such a row stands.
    "mask_more_rows_than_src": lambda: [(mask_at([30, 31, 32, 33]), rnd(4, H, seed=1)),
                                        (mask_at([2, 8, 9, 30, 31]), rnd(3, H, seed=2))],
    "positions_out_of_range_skipped": lambda: [(torch.tensor([-1, 3, N, 7, 2 ** 40, -(2 ** 40)]), rnd(6, H, seed=3)),
                                               (mask_at([10, 11]), rnd(2, H, seed=4))],
    "empty_pair_between": lambda: pairs_of([mask_at([1, 2]), mask_at([]), mask_at([2, 3])]),
    "one_pair": lambda: pairs_of([mask_at([0, N - 1])]),
    "concatenated_sources": lambda: pairs_of([mask_at(range(0, 12)), mask_at(range(6, 9))], dtypes=(F32, BF16)),
    "batched_overlap": lambda: [(mask_at([1, 2, 30], (2, N // 2)), rnd(3, H, seed=5)),
                                (mask_at([2, 30, 31], (2, N // 2)), rnd(3, H, seed=6))],
}


@pytest.mark.parametrize("name", list(DEVICE_CASES))
def test_device_map_semantics(name, spy):
    pairs = DEVICE_CASES[name]()
    shape = (2, N // 2, H) if name.startswith("batched") else (N, H)
    dst = rnd(*shape, dtype=BF16 if name == "concatenated_sources" else F32, seed=7)
    effective = [_effective(N, index, src) for index, src in pairs]
    expected = _Reference(truncating=True)(dst, effective)
    for _ in range(2):
        out = dst.clone()
        spy.clear()
        rows = _device_merge(out, pairs)
        assert rows.tolist() == _expected_map(N, pairs)
        assert_bits_equal(out, expected, name)
        assert spy.launches() == 1


@pytest.mark.parametrize("name", ["mask_fewer_rows_than_src", "mask_more_rows_than_src",
                                  "positions_out_of_range_skipped"])
def test_device_map_accumulate_without_overlap(name):
    pairs = DEVICE_CASES[name]()
    dst = rnd(N, H, seed=7)
    out = dst.clone()
    _device_merge(out, pairs, accumulate=True)
    assert_bits_equal(out, _Reference(truncating=True)(dst, [_effective(N, i, s) for i, s in pairs], True))


# (Accumulate with device indexes never takes the concatenated map: api.merge_modalities_ runs it pair by pair, so
# that overlapping adds all land; tests/gpu/test_modalities.py checks it through the public call.)
