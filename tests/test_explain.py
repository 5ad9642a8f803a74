"""explain() is what runs: path, kind of launch, configuration and concatenation, for the first call of a
signature and for memo hits (core._prepared), on every branch the CPU reaches (the Triton path runs under the
interpreter, where every mask is a host mask; tests/gpu/test_explain.py covers device masks).

A spy on core.run, the one executor as core.merge_ calls it, records what ran: the ``prepared.decision`` of each
run. Below it the spy records what the executor reached at its lowest level (the launch of a tensor source, with
its kind and configuration; the item kernel for a list read in place; the row copy through a plan's row map; the
PyTorch runner by name) and whether a list was concatenated (torch.cat), so that a decision the executor did not
honour shows too; and the signatures core._prepare was called with, so that each check knows whether its calls
were prepared or memo hits.
"""
from __future__ import annotations

import json
from typing import NamedTuple

import pytest
import torch

import mmmerge_triton as mm
from mmmerge_triton import core, dispatch, executor, kernel_config, paths

from .test_dispatch import SHIPPED


class Call(NamedTuple):
    """What one call ran (decisions), reached (path, kind, config), concatenated, and prepared (signatures)."""

    ran: list
    reached: list
    concatenated: bool
    prepared: list


class Spy:
    """Records each call's Call (see the module's docstring)."""

    def __init__(self, monkeypatch):
        self.ran: list = []
        self.reached: list = []
        self.prepared: list = []
        self.concatenated = False
        launching = []  # inside executor._launch, whose row copies are its own (not a plan's)
        real_run, real_prepare = core.run, core._prepare
        real_launch, real_items, real_row_copy = executor._launch, executor.merge_items, executor.row_copy

        def run(prepared, *args, **kwargs):
            self.ran.append(prepared.decision)
            return real_run(prepared, *args, **kwargs)

        def prepare(key, *args):
            self.prepared.append(key)
            return real_prepare(key, *args)

        def launch(launch, *args):
            self.reached.append(("triton", launch.kind, launch.config))
            launching.append(launch)
            try:
                return real_launch(launch, *args)
            finally:
                launching.pop()

        def merge_items(*args):
            self.reached.append(("triton", kernel_config.ITEMS, args[5]))
            return real_items(*args)

        def row_copy(dst, src, rows, count, mode, cfg, **kwargs):
            if not launching:
                self.reached.append(("triton", kernel_config.PLAN_ROWS, cfg))
            return real_row_copy(dst, src, rows, count, mode, cfg, **kwargs)

        monkeypatch.setattr(core, "run", run)
        monkeypatch.setattr(core, "_prepare", prepare)
        monkeypatch.setattr(executor, "_launch", launch)
        monkeypatch.setattr(executor, "merge_items", merge_items)
        monkeypatch.setattr(executor, "row_copy", row_copy)
        for name, runner in list(paths.RUNNERS.items()):
            monkeypatch.setitem(paths.RUNNERS, name, lambda *args, _n=name, _r=runner: self.reached.append(
                (_n, None, None)) or _r(*args))
        real_cat = torch.cat

        def cat(tensors, *args, **kwargs):
            self.concatenated = True
            return real_cat(tensors, *args, **kwargs)

        monkeypatch.setattr(torch, "cat", cat)

    def call(self, dst, src, mask, **kwargs) -> Call:
        self.ran, self.reached, self.prepared = [], [], []
        self.concatenated = False
        mm.merge_multimodal_embeddings(dst, src, mask, **kwargs)
        return Call(list(self.ran), list(self.reached), self.concatenated, list(self.prepared))


MEMO = ("first", "hit", "none")


def check(spy: Spy, dst, src, mask, label: str, memo: str, **kwargs) -> kernel_config.Decision:
    """The call, explain(), the call again: explain() equals what both calls ran. ``memo``: what the memo does
    for the first call: "first" (it prepares the call's signature; the second call hits the entry), "hit" (an
    earlier call prepared it; both calls hit), "none" (the call has no signature: prepared on every call)."""
    assert memo in MEMO
    first = spy.call(dst, src, mask, **kwargs)
    decision = mm.explain(dst, src, mask, **kwargs)
    second = spy.call(dst, src, mask, **kwargs)
    for which, call in (("first call", first), ("second call", second)):
        what = f"{label}, {which}"
        assert call.ran == [decision], f"{what}: ran {call.ran}, explained {decision}"
        assert call.reached == [(decision.path, decision.kind, decision.config)], (
            f"{what}: reached {call.reached}, explained {decision}")
        if isinstance(src, list) and len(src) > 1:
            assert call.concatenated == decision.concatenate, f"{what}: concatenated {call.concatenated}, {decision}"
    if memo == "first":
        assert len(first.prepared) == 1 and first.prepared[0] is not None, f"{label}: prepared {first.prepared}"
    else:
        assert first.prepared == ([] if memo == "hit" else [None]), f"{label}: prepared {first.prepared}"
    assert second.prepared == ([None] if memo == "none" else []), f"{label}: second call prepared {second.prepared}"
    assert (decision.config is None) == (decision.path != "triton"), f"{label}: {decision}"
    return decision


def inputs(n: int, m: int, hidden: int = 16, seed: int = 0):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]] = True
    return torch.randn(n, hidden), torch.randn(m, hidden), mask


@pytest.fixture
def table_rules(monkeypatch):
    """path="auto" decides by the shipped H100 table (CPU-mask rules), as on a GPU."""
    table = json.loads(SHIPPED.read_text())
    monkeypatch.setattr(dispatch, "_table_decision", lambda dst, on_device, src_dtype, n, rows:
                        dispatch.decide_from_table(table, "cpu", "bf16", "bf16", n, dst.shape[-1], rows))
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


def test_tensor_source_first_call_and_memo_hits(monkeypatch, table_rules):
    spy = Spy(monkeypatch)
    for n, m in [(600, 300), (3000, 40), (9000, 4500), (20000, 100)]:
        for seed, memo in enumerate(("first", "hit", "hit")):
            dst, src, mask = inputs(n, m, seed=seed)
            decision = check(spy, dst, src, mask, f"N={n} M={m} {memo}", memo)
            assert decision.kind == kernel_config.HOST_ROWS


def test_explain_before_the_first_call_prepares_the_entry_it_runs(monkeypatch, table_rules):
    """explain() on a new signature prepares its entry, which the call then hits and runs."""
    spy = Spy(monkeypatch)
    dst, src, mask = inputs(3000, 40)
    decision = mm.explain(dst, src, mask)
    assert len(spy.prepared) == 1 and spy.prepared[0] is not None
    call = spy.call(dst, src, mask)
    assert call.prepared == [] and call.ran == [decision]
    assert call.reached == [(decision.path, decision.kind, decision.config)]


def test_path_triton_by_name_where_the_table_picks_another_path(monkeypatch):
    spy = Spy(monkeypatch)
    monkeypatch.setattr(dispatch, "_table_decision", lambda *args: kernel_config.Decision(
        "index_put", None, None, False, "the table's pick"))
    dispatch.clear_cache()
    for memo in ("first", "hit"):
        decision = check(spy, *inputs(500, 100), f"triton by name, {memo}", memo, path="triton")
        assert decision.path == "triton" and decision.config == mm.kernel_config.default_of_kind(16, False)
    decision = check(spy, *inputs(500, 100), "auto", "first")
    assert decision.path == "index_put"
    dispatch.clear_cache()


@pytest.mark.parametrize("pays", [True, False], ids=["read_in_place", "concatenated"])
def test_a_list_is_read_in_place_or_concatenated_as_explained(monkeypatch, table_rules, pays):
    spy = Spy(monkeypatch)
    monkeypatch.setattr(dispatch, "items_in_place_pays", lambda *args: pays)
    for call in ("first", "again"):  # a list has no signature: prepared on every call
        dst, src, mask = inputs(400, 90)
        items = [src[:30], src[30:70], src[70:]]
        decision = check(spy, dst, items, mask, f"list {call}", "none")
        assert (decision.kind == kernel_config.ITEMS) == pays and decision.concatenate != pays
    dst, src, mask = inputs(400, 90)
    items = [src[:30], src[30:70].clone().requires_grad_(), src[70:]]
    with torch.no_grad():  # no gradient recorded: still read in place where it pays
        assert check(spy, dst, items, mask, "list, no_grad", "none").concatenate != pays
    dst = torch.randn(400, 16)  # items that are rows of dst: concatenated first (a copy), whatever pays
    items = [dst[310:340], dst[340:380], dst[380:400]]
    mask = torch.zeros(400, dtype=torch.bool)
    mask[:90] = True
    decision = check(spy, dst, items, mask, "list sharing dst", "none")
    assert decision.concatenate and decision.kind == kernel_config.HOST_ROWS


def test_a_plan_runs_its_row_map_as_explained(monkeypatch, table_rules):
    spy = Spy(monkeypatch)
    dst, src, mask = inputs(700, 200)
    plan = mm.MergePlan(mask)
    for call in ("first", "again"):  # a call with a plan has no signature
        decision = check(spy, dst, src, None, f"plan {call}", "none", plan=plan)
        assert decision.kind == kernel_config.PLAN_ROWS


@pytest.mark.parametrize("path", ["index_put", "index_copy", "masked_scatter"])
def test_pytorch_paths_by_name_and_refusals(monkeypatch, table_rules, path):
    spy = Spy(monkeypatch)
    for memo in ("first", "hit"):
        decision = check(spy, *inputs(300, 50), f"{path} {memo}", memo, path=path)
        assert (decision.path, decision.kind, decision.config) == (path, None, None)
    dst, src, mask = inputs(300, 50)
    decision = check(spy, dst.double(), src.double(), mask, "float64: refused, index_put", "first")
    assert decision.path == "index_put" and "float" in decision.reason
