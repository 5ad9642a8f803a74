"""Headroom: the largest prompt each merge path handles when a serving engine has filled the GPU.

An engine allocates its KV cache up front and keeps a margin free for activations. We do the same: one
allocation that leaves MARGIN free (1, 2, 4 GiB, read with torch.cuda.mem_get_info after emptying the cache),
then bisect over N for the largest merge that runs without torch.OutOfMemoryError, per path and hidden size.

What counts against the margin, as in an engine: inputs_embeds [N, H] bf16 (2·N·H B), mm_embeds [N/2, H]
bf16 (N·H B), the mask where it lives on the GPU (N B), and every temporary of the merge, each rounded up by
PyTorch's allocator (2 MB granules for large blocks). What does not: the CUDA context and the kernels'
modules (loaded by a warm-up of every path before the margin is set), and the host-side mask. So even a merge
with no temporaries stops near N = margin / (3·H) bytes; a path's temporaries show as a smaller N.

Half the rows are visual, in image blocks (cases.make_mask). Inputs are torch.empty: only their size matters.
Also recorded, with no cache allocated: each path's peak extra memory at one N (timing.peak_extra_bytes).

    python bench/matters/headroom.py --out OUT        # H100: about 40 s
    python bench/matters/headroom.py --smoke          # CPU: the bisection against a simulated margin
"""
from __future__ import annotations

import os
import time

import torch

import common
import mmmerge_triton as mm

GIB = 1 << 30

# name -> (where the mask lives, path= of merge_multimodal_embeddings). Every path through the package's API:
# path="index_copy" with a GPU mask is SGLang's recipe (cumsum ranks scattered into a row list, index_copy_).
PATHS = {
    "masked_scatter (GPU mask, HF)": ("gpu", "masked_scatter"),
    "index_put (CPU mask, vLLM)": ("cpu", "index_put"),
    "index_copy (GPU mask, SGLang)": ("gpu", "index_copy"),
    "ours (CPU mask)": ("cpu", "auto"),
    "ours (GPU mask)": ("gpu", "auto"),
}


def merge(n: int, hidden: int, where: str, path: str, device: torch.device) -> None:
    """Allocate one prompt's inputs as an engine holds them, and merge: whether it fits is what matters."""
    mask = common.make_mask(n, n // 2, "blocks")  # host: an engine builds it from the token ids
    if where == "gpu":
        mask = mask.to(device)  # N bytes on the device
    inputs_embeds = torch.empty(n, hidden, dtype=torch.bfloat16, device=device)  # 2·N·H bytes
    mm_embeds = torch.empty(n // 2, hidden, dtype=torch.bfloat16, device=device)  # N·H bytes (N/2 rows)
    mm.merge_multimodal_embeddings(inputs_embeds, mm_embeds, mask, path=path)
    common.synchronize(device)


def fits(n: int, hidden: int, where: str, path: str, device: torch.device, simulated_margin: int | None) -> bool:
    """Whether one merge at N runs without running out of memory; the GPU left as it was either way.
    simulated_margin (smoke run, CPU): raise as the allocator would when the inputs alone exceed it."""
    try:
        if simulated_margin is not None and 3 * n * hidden + (n if where == "gpu" else 0) > simulated_margin:
            raise torch.OutOfMemoryError("simulated: the inputs exceed the margin")
        merge(n, hidden, where, path, device)
        return True
    except torch.OutOfMemoryError:
        return False
    except RuntimeError as error:  # the driver's own OOM (a module load, cuBLAS workspace): no fit either
        if "out of memory" not in str(error):
            raise
        return False
    finally:  # the trial's tensors are freed by now (the exception is gone): hand their memory back
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_n(hidden: int, where: str, path: str, device: torch.device, margin: int, cap: int,
              simulated: bool) -> tuple[int, int]:
    """Bisection over N: lo always fits, hi never does. The inputs alone (3·N·H bytes) bound N from above;
    stop at 0.1% (or 64 rows). Returns (largest N that fits, trials)."""
    lo, hi = 0, min(cap, margin // (3 * hidden) + 2)
    trials = 1
    if fits(hi, hidden, where, path, device, margin if simulated else None):  # checks the bracket: fits at the cap only
        return hi, trials
    while hi - lo > max(64, lo // 1000):
        mid = (lo + hi) // 2
        trials += 1
        if fits(mid, hidden, where, path, device, margin if simulated else None):
            lo = mid
        else:
            hi = mid
    return lo, trials


def main() -> None:
    args = common.arguments(__doc__)
    device = common.device_for(args)
    margins_gib = (1, 2, 4) if not args.smoke else (1,)
    hiddens = (3584, 5120) if not args.smoke else (64,)
    cap = 1 << 21  # 2M tokens: far above any margin here; keeps a runaway bisection short
    peak_n, peak_h = (65536, 5120) if not args.smoke else (512, 64)
    report = common.Report(args, "headroom", device, {
        "margins_gib": margins_gib, "hidden": hiddens, "dtype": "bf16", "visual_fraction": 0.5,
        "pattern": "blocks", "cap_n": cap, "resolution": "0.1% of N or 64 rows",
        "counted": "inputs_embeds [N,H] + mm_embeds [N/2,H] (bf16) + GPU mask [N] bool where on the GPU + the "
                   "merge's temporaries, at the allocator's rounding; not the CUDA context or kernel modules "
                   "(warmed up first) or the host mask",
        "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "total_bytes": torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None,
        "paths": {name: {"mask": where, "path": path} for name, (where, path) in PATHS.items()},
        "peak_at": {"n": peak_n, "hidden": peak_h}})

    # Peak extra memory of one merge, on an empty GPU: what each path allocates beyond its inputs.
    # This also warms every path up (kernels compiled and loaded) before the margin is set.
    for name, (where, path) in PATHS.items():
        mask = common.make_mask(peak_n, peak_n // 2, "blocks")
        mask = mask.to(device) if where == "gpu" else mask
        dst = torch.randn(peak_n, peak_h, dtype=torch.bfloat16, device=device)
        src = torch.randn(peak_n // 2, peak_h, dtype=torch.bfloat16, device=device)
        peak = common.timing.peak_extra_bytes(lambda: mm.merge_multimodal_embeddings(dst, src, mask, path=path),
                                              device)
        # Every kernel configuration the bisection can pick (the tuned table keys on log2 N and H), compiled and
        # loaded before the margin is set: a module loaded later would take device memory from the margin.
        sizes = [1 << k for k in range(12, 20)] if path == "auto" else [1 << 12, 1 << 16]
        for n, hidden in ((n, h) for n in (sizes if not args.smoke else [256]) for h in hiddens):
            merge(n, hidden, where, path, device)
        del mask, dst, src
        common.clean(device)
        report.add({"kind": "peak", "path": name, "n": peak_n, "hidden": peak_h, "peak_extra_bytes": peak,
                    "per_element_of_dst": None if peak is None else peak / (peak_n * peak_h)})
        common.log(f"peak extra {name}: {peak if peak is None else f'{peak / common.MB:.1f} MB'}")

    for margin_gib in margins_gib:
        common.clean(device)
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            kv_cache = torch.empty(free - margin_gib * GIB, dtype=torch.uint8, device=device)  # the KV cache
            common.clean(device)
            margin = torch.cuda.mem_get_info(device)[0]  # what is really free now (allocator, driver rounding)
        else:
            total, kv_cache, margin = None, None, margin_gib * (1 << 20)  # smoke: a MiB stands in for a GiB
        common.log(f"margin {margin_gib} GiB: {margin} bytes free" + (f" of {total / GIB:.1f} GiB" if total else ""))
        for hidden in hiddens:
            for name, (where, path) in PATHS.items():
                start = time.perf_counter()
                n, trials = largest_n(hidden, where, path, device, margin, cap, simulated=device.type != "cuda")
                report.add({"kind": "largest_n", "margin_gib": margin_gib, "margin_free_bytes": margin,
                            "hidden": hidden, "path": name, "largest_n": n, "trials": trials,
                            "inputs_bytes_at_largest": 3 * n * hidden,
                            "seconds": round(time.perf_counter() - start, 2)})
                common.log(f"  H={hidden} {name:32s} largest N = {n:8d} ({trials} trials)")
        del kv_cache
        common.clean(device)

    found = {(r["path"], r["margin_gib"], r["hidden"]): r["largest_n"]
             for r in report.data["records"] if r["kind"] == "largest_n"}
    columns = [(m, h) for m in margins_gib for h in hiddens]
    print("\nlargest N that merges (bf16, half visual), per free margin and H")
    print(f"{'path':32s}" + "".join(f"{f'{m} GiB, {h}':>14}" for m, h in columns))
    for name in PATHS:
        print(f"{name:32s}" + "".join(f"{found[name, m, h]:>14}" for m, h in columns))
    print(f"wrote {report.path}")


if __name__ == "__main__":
    main()
