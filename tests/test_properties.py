"""Property test: over random sizes, dtypes, mask densities and paths, the merge equals the reference."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmmerge_triton as mm

from .conftest import DTYPES, assert_merged, randn


@st.composite
def merge_cases(draw):
    batch = draw(st.sampled_from([None, 1, 3]))  # None: a 2-D dst
    n = draw(st.integers(1, 100))
    hidden = draw(st.integers(1, 130))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**16))
    shape = (n,) if batch is None else (batch, n)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density
    return {
        "mask": mask,
        "hidden": hidden,
        "src_dtype": draw(st.sampled_from(DTYPES)),
        "dst_dtype": draw(st.sampled_from(DTYPES)),
        "accumulate": draw(st.booleans()),
        "path": draw(st.sampled_from(mm.PATHS)),
        "seed": seed,
    }


@settings(max_examples=40, deadline=None)
@given(case=merge_cases())
def test_merge_equals_reference_for_random_inputs(case):
    mask, hidden = case["mask"], case["hidden"]
    dst = randn(*mask.shape, hidden, dtype=case["dst_dtype"], seed=case["seed"])
    src = randn(int(mask.sum()), hidden, dtype=case["src_dtype"], seed=case["seed"] + 1)
    out = mm.masked_row_scatter_(dst.clone(), mask, src, accumulate=case["accumulate"], path=case["path"])
    assert_merged(out, dst, mask, src, case["accumulate"], case["path"])
