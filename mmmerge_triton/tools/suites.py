"""Benchmark suites beyond the per-path grid (``mmmerge-bench --suite items|plan|deepstack``).

- items: many per-item tensors merged in one launch, read in place, against ``torch.cat`` then a scatter.
- plan: a MergePlan reused across merges against preparing the mask on every call.
- deepstack: sparse accumulate into the visual rows at each layer against the dense add of the engines
  and HF's clone-and-index.
Each reports device time, loop time and peak extra memory per variant (timing.py), within one run, the variants
of a record timed together in interleaved rounds (timing.measure; the items suite's two forced variants each
alone, under their own patch); on a CPU, wall times only (a smoke test of the tooling).

Runtime internals used (no public function does the same): ``dispatch.items_in_place_pays``, patched to force a
list to be read in place or concatenated; ``paths.merge_index_put``, vLLM's bare index_put after its torch.cat.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch

from .. import MergePlan, deepstack_add, dispatch, masked_row_scatter_, merge_multimodal_embeddings, paths
from . import timing
from .cases import make_mask

MB = 1e6


@contextlib.contextmanager
def _items_in_place(forced: bool):
    """Force the list merge to read items in place (or to concatenate them), whatever the loop-time rule says."""
    with mock.patch.object(dispatch, "items_in_place_pays", lambda *args: forced):
        yield


def items_suite(device: torch.device, quick: bool) -> list[dict]:
    """1 to 512 items of 256-4096 rows, H 3584 and 8192, bf16, a CPU mask with 20% text rows between."""
    shapes = [(1, 4096), (8, 1024), (8, 4096), (64, 256), (64, 1024), (512, 256)]
    hiddens = (3584, 8192)
    if quick:
        shapes, hiddens = [(1, 1024), (8, 256), (64, 64)], (1024,)
    records = []
    for (count, rows), hidden in ((s, h) for h in hiddens for s in shapes):
        m = count * rows
        n = m + m // 4
        mask = make_mask(n, m, "blocks")
        dst = torch.randn(n, hidden, device=device, dtype=torch.bfloat16)
        items = [torch.randn(rows, hidden, device=device, dtype=torch.bfloat16) for _ in range(count)]
        merge = lambda: merge_multimodal_embeddings(dst, items, mask)  # noqa: E731
        with _items_in_place(True):
            results = timing.measure({"items in place (ours)": merge}, device)
        with _items_in_place(False):
            results |= timing.measure({"cat + ours": merge}, device)
        results |= timing.measure({
            "auto (the rule picks)": merge,
            "cat + index_put (vLLM)": lambda: paths.merge_index_put(dst, mask, torch.cat(items), False),
        }, device)
        records.append({"items": count, "rows_per_item": rows, "hidden": hidden, "n": n,
                        "moved_bytes": 4 * m * hidden, "results": results})
        del dst, items
    return records


def plan_suite(device: torch.device, quick: bool) -> list[dict]:
    """Three accumulate merges into one mask's rows (deepstack-like), the mask prepared once (plan) or per call."""
    shapes = [(2048, 2048), (16384, 4096)] if not quick else [(1024, 1024)]
    records = []
    wheres = ("cpu", "gpu") if device.type == "cuda" else ("cpu",)  # on a CPU both masks are the same tensor
    for (n, hidden), where in ((s, w) for s in shapes for w in wheres):
        mask = make_mask(n, n // 2, "blocks")
        mask = mask.to(device) if where == "gpu" else mask
        hs = torch.randn(n, hidden, device=device, dtype=torch.bfloat16)
        feats = [torch.randn(n // 2, hidden, device=device, dtype=torch.bfloat16) for _ in range(3)]

        def per_call():
            for f in feats:
                masked_row_scatter_(hs, mask, f, accumulate=True)

        def with_plan():
            plan = MergePlan(mask, device=device)
            for f in feats:
                masked_row_scatter_(hs, src=f, plan=plan, accumulate=True)

        records.append({"n": n, "hidden": hidden, "mask": where, "layers": 3,
                        "results": timing.measure({"mask per call": per_call, "plan once": with_plan}, device)})
    return records


def deepstack_suite(device: torch.device, quick: bool) -> list[dict]:
    """3 deepstack layers, half the rows visual, bf16: ours against the engines' dense add and HF's clone-and-index."""
    shapes = [(1024, 2048), (16384, 4096)] if not quick else [(512, 1024)]
    layers = 3
    records = []
    for n, hidden in shapes:
        cpu_mask = make_mask(n, n // 2, "blocks")
        gpu_mask = cpu_mask.to(device)
        hs = torch.randn(n, hidden, device=device, dtype=torch.bfloat16)
        feats = [torch.randn(n // 2, hidden, device=device, dtype=torch.bfloat16) for _ in range(layers)]
        stacked = torch.cat(feats, dim=1)  # [K, L*H]: how engines receive the multiscale features

        def dense_add():  # vLLM / SGLang: scatter into zeros [N, L*H], then add all N rows per layer
            buffer = hs.new_zeros(n, layers * hidden)
            buffer[cpu_mask] = stacked
            out = hs
            for i in range(layers):
                out = out + buffer[:, i * hidden:(i + 1) * hidden]
            return out

        def hf_clone_index():  # transformers' Qwen3-VL _deepstack_process, a GPU mask (two syncs per layer)
            out = hs
            for f in feats:
                out = out.clone()
                out[gpu_mask, :] = out[gpu_mask, :] + f
            return out

        def sparse_inplace():  # ours, inference: one plan, one accumulate launch per layer
            plan = MergePlan(gpu_mask)
            for f in feats:
                deepstack_add(hs, f, plan)
            return hs

        calls = {"dense add (vLLM/SGLang)": dense_add, "clone+index (HF)": hf_clone_index,
                 "sparse accumulate (ours)": sparse_inplace}
        records.append({"n": n, "hidden": hidden, "layers": layers, "visual_rows": n // 2,
                        "results": timing.measure(calls, device)})
    return records


SUITES = {"items": items_suite, "plan": plan_suite, "deepstack": deepstack_suite}


def print_suite(name: str, records: list[dict], cpu: bool = False) -> None:
    """A table per record; on a CPU the one-call and loop figures are wall time, and host µs and peak MB
    (not measured there) are left out."""
    for record in records:
        title = ", ".join(f"{k}={v}" for k, v in record.items() if k not in ("results", "moved_bytes"))
        print(f"\n[{name}] {title}")
        if cpu:
            print(f"  {'variant':28s}{'wall µs':>10s}{'loop µs':>10s}   (wall time: median of one call; loop: per "
                  "call, back to back)")
        else:
            print(f"  {'variant':28s}{'device µs':>11s}{'loop µs':>10s}{'host µs':>10s}{'peak MB':>10s}")
        for variant, r in record["results"].items():
            if cpu:
                print(f"  {variant:28s}{r['device_us']:10.1f}{r['loop_us']:10.1f}")
                continue
            peak = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / MB:.1f}"
            print(f"  {variant:28s}{r['device_us']:11.1f}{r['loop_us']:10.1f}{r['host_us']:10.1f}{peak:>10s}")
