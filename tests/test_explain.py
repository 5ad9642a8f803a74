"""explain() is what runs: path, kind of launch, configuration and concatenation, for first calls and for cache
hits (the prepared call of lean.py), on every branch the CPU reaches (the Triton path runs under the
interpreter, where every mask is a host mask; tests/gpu/test_explain.py covers device masks).

A spy records, at the lowest level each route reaches, what actually ran: the executor's launch (its kind and
configuration) for a tensor source, the item kernel for a list read in place, the row copy through a plan's
row map, or the PyTorch runner by name.
"""
from __future__ import annotations

import json

import pytest
import torch

import mmmerge_triton as mm
from mmmerge_triton import api, dispatch, executor, lean, paths

from .test_dispatch import SHIPPED


class Spy:
    """What ran in each call: (path, kind, config) tuples, and whether a list was concatenated (torch.cat)."""

    def __init__(self, monkeypatch):
        self.ran: list[tuple] = []
        self.concatenated = False
        real_execute, real_items, real_row_copy = executor._execute, paths.merge_items, paths.row_copy
        monkeypatch.setattr(executor, "_execute", lambda launch, *a: self.ran.append(
            ("triton", launch.kind, launch.config)) or real_execute(launch, *a))
        monkeypatch.setattr(paths, "merge_items", lambda dst, mask, items, stride, acc, cfg, rowmap=None: self.ran.append(
            ("triton", executor.ITEMS, cfg)) or real_items(dst, mask, items, stride, acc, cfg, rowmap))
        monkeypatch.setattr(paths, "row_copy", lambda dst, src, rows, count, mode, cfg: self.ran.append(
            ("triton", executor.PLAN_ROWS, cfg)) or real_row_copy(dst, src, rows, count, mode, cfg))
        for name, runner in list(paths.RUNNERS.items()):
            if name != "triton":
                monkeypatch.setitem(paths.RUNNERS, name, lambda *args, _n=name, _r=runner: self.ran.append(
                    (_n, None, None)) or _r(*args))
        real_cat = torch.cat

        def cat(tensors, *args, **kwargs):
            self.concatenated = True
            return real_cat(tensors, *args, **kwargs)

        monkeypatch.setattr(api.torch, "cat", cat)

    def call(self, dst, src, mask, **kwargs) -> None:
        self.ran.clear()
        self.concatenated = False
        mm.merge_multimodal_embeddings(dst, src, mask, **kwargs)


def check(spy: Spy, dst, src, mask, label: str, **kwargs) -> dispatch.Decision:
    """explain() before the call equals what the call ran."""
    decision = mm.explain(dst, src, mask, **kwargs)
    spy.call(dst, src, mask, **kwargs)
    assert spy.ran == [(decision.path, decision.kind, decision.config)], f"{label}: ran {spy.ran}, explained {decision}"
    if isinstance(src, list) and len(src) > 1:
        assert spy.concatenated == decision.concatenate, f"{label}: concatenated {spy.concatenated}, {decision}"
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


def test_tensor_source_first_call_and_cache_hits(monkeypatch, table_rules):
    spy = Spy(monkeypatch)
    for n, m in [(600, 300), (3000, 40), (9000, 4500), (20000, 100)]:
        for call in ("first", "hit", "hit again"):
            dst, src, mask = inputs(n, m, seed=len(call))
            decision = check(spy, dst, src, mask, f"N={n} M={m} {call}")
            assert decision.kind == executor.HOST_ROWS
        assert lean._entries, "the calls were prepared (lean)"


def test_path_triton_by_name_where_the_table_picks_another_path(monkeypatch):
    spy = Spy(monkeypatch)
    monkeypatch.setattr(dispatch, "_table_decision", lambda *args: dispatch.Decision(
        "index_put", None, None, False, "the table's pick"))
    dispatch.clear_cache()
    for call in ("first", "hit"):
        decision = check(spy, *inputs(500, 100), f"triton by name, {call}", path="triton")
        assert decision.path == "triton" and decision.config == mm.kernel_config.default_of_kind(16, False)
    decision = check(spy, *inputs(500, 100), "auto")
    assert decision.path == "index_put"
    dispatch.clear_cache()


@pytest.mark.parametrize("pays", [True, False], ids=["read_in_place", "concatenated"])
def test_a_list_is_read_in_place_or_concatenated_as_explained(monkeypatch, table_rules, pays):
    spy = Spy(monkeypatch)
    monkeypatch.setattr(dispatch, "items_in_place_pays", lambda *args: pays)
    for call in ("first", "again"):
        dst, src, mask = inputs(400, 90)
        items = [src[:30], src[30:70], src[70:]]
        decision = check(spy, dst, items, mask, f"list {call}")
        assert (decision.kind == executor.ITEMS) == pays and decision.concatenate != pays
    dst, src, mask = inputs(400, 90)
    items = [src[:30], src[30:70].clone().requires_grad_(), src[70:]]
    with torch.no_grad():  # no gradient recorded: still read in place where it pays
        assert check(spy, dst, items, mask, "list, no_grad").concatenate != pays
    dst = torch.randn(400, 16)  # items that are rows of dst: concatenated first (a copy), whatever pays
    items = [dst[310:340], dst[340:380], dst[380:400]]
    mask = torch.zeros(400, dtype=torch.bool)
    mask[:90] = True
    decision = check(spy, dst, items, mask, "list sharing dst")
    assert decision.concatenate and decision.kind == executor.HOST_ROWS


def test_a_plan_runs_its_row_map_as_explained(monkeypatch, table_rules):
    spy = Spy(monkeypatch)
    dst, src, mask = inputs(700, 200)
    plan = mm.MergePlan(mask)
    for call in ("first", "again"):
        decision = check(spy, dst, src, None, f"plan {call}", plan=plan)
        assert decision.kind == executor.PLAN_ROWS


@pytest.mark.parametrize("path", ["index_put", "index_copy", "masked_scatter"])
def test_pytorch_paths_by_name_and_refusals(monkeypatch, table_rules, path):
    spy = Spy(monkeypatch)
    for call in ("first", "hit"):
        decision = check(spy, *inputs(300, 50), f"{path} {call}", path=path)
        assert (decision.path, decision.kind, decision.config) == (path, None, None)
    dst, src, mask = inputs(300, 50)
    decision = check(spy, dst.double(), src.double(), mask, "float64: refused, index_put")
    assert decision.path == "index_put" and "float" in decision.reason
