"""Stalls: how long a merge with a GPU mask blocks the host when the GPU still has work queued.

An engine's host runs ahead of the GPU: while step k's kernels run, it prepares step k+1. A call that syncs
waits for everything queued before it, so its cost is the queue's length, not its own. We queue a known
amount of GPU work (torch.cuda._sleep, calibrated to QUEUE_MS = 5 and 20 ms), then call the merge, and read:

- blocked_ms: wall time of the call itself (the host can do nothing else meanwhile);
- next_step_ms: when a following host step (one tiny launch) has been issued, from the call's start;
- done_ms: when the GPU has finished the merge, from the call's start (about the queue plus the merge).

A call that never syncs blocks for its host time (tens of µs) whatever the queue; one that syncs blocks for
about the queue. Cases: index_put with a GPU mask (a nonzero: syncs) and with a CPU mask (vLLM; no sync since
PyTorch 2.9, for reference), masked_scatter, SGLang's index_copy recipe, ours; the merge line as transformers
writes it (``inputs_embeds.masked_scatter(mask[..., None], features)``) with the transformers switch off and
on; and a whole transformers forward (the tiny Qwen2-VL of tests/models/tiny_vlms.py) off and on, with the
lines where it syncs (torch.cuda.set_sync_debug_mode("warn")).

    python bench/matters/stalls.py --out OUT      # H100: about 15 s
    python bench/matters/stalls.py --smoke        # CPU: nothing is asynchronous there; proves it runs
"""
from __future__ import annotations

import linecache
import statistics
import time
import warnings
from pathlib import Path

import torch

import common
import mmmerge_triton as mm
from mmmerge_triton.integrations import transformers as mmt

QUEUE_MS = (5.0, 20.0)
REPS = 5


def cycles_per_ms(device: torch.device) -> float:
    """torch.cuda._sleep spins a number of cycles; how many make a millisecond on this card (events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / start.elapsed_time(end)


def stall(fn, queue_ms: float, device: torch.device, per_ms: float) -> dict:
    """Medians over REPS of blocked / next-step / done times (ms) of fn() behind queue_ms of GPU work."""
    fn()  # warm-up: compiled, cached, allocated
    common.synchronize(device)
    scratch = torch.zeros(1, device=device)
    samples = {"blocked_ms": [], "next_step_ms": [], "done_ms": [], "queue_measured_ms": []}
    for _ in range(REPS):
        common.synchronize(device)
        if device.type == "cuda":
            begin, queued = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            torch.cuda._sleep(int(queue_ms * per_ms))
            queued.record()
        start = time.perf_counter()
        fn()
        returned = time.perf_counter()
        scratch.add_(1)  # the next host step: one more launch
        issued = time.perf_counter()
        common.synchronize(device)
        done = time.perf_counter()
        samples["blocked_ms"].append((returned - start) * 1e3)
        samples["next_step_ms"].append((issued - start) * 1e3)
        samples["done_ms"].append((done - start) * 1e3)
        if device.type == "cuda":
            samples["queue_measured_ms"].append(begin.elapsed_time(queued))
    result = {key: statistics.median(values) if values else None for key, values in samples.items()}
    result["syncs"] = result["blocked_ms"] > 0.5 * queue_ms if device.type == "cuda" else None
    return result


def sync_sites(fn, device: torch.device) -> list[str]:
    """The source lines where fn() synchronizes with the GPU ("file:line  code"), in order, each once."""
    if device.type != "cuda":
        return []
    fn()  # first calls compile and cache: only a warm call's syncs are the case's own
    torch.cuda.synchronize(device)
    sites = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where = "/".join(Path(w.filename).parts[-3:])
            site = f"{where}:{w.lineno}  {linecache.getline(w.filename, w.lineno).strip()}"
            if site not in sites:
                sites.append(site)
    return sites


def main() -> None:
    args = common.arguments(__doc__)
    device = common.device_for(args)
    n, hidden = (16384, 4096) if not args.smoke else (512, 64)
    per_ms = cycles_per_ms(device) if device.type == "cuda" else 0.0
    report = common.Report(args, "stalls", device, {
        "n": n, "hidden": hidden, "dtype": "bf16", "visual_fraction": 0.5, "pattern": "blocks",
        "queue_ms": QUEUE_MS, "reps": REPS, "sleep_cycles_per_ms": per_ms,
        "measures": {"blocked_ms": "wall time of the call", "next_step_ms": "call start to a following tiny launch "
                     "issued", "done_ms": "call start to the GPU finished (synchronize)"}})

    cpu_mask = common.make_mask(n, n // 2, "blocks")
    gpu_mask = cpu_mask.to(device)
    inputs_embeds = torch.randn(n, hidden, dtype=torch.bfloat16, device=device)
    mm_embeds = torch.randn(n // 2, hidden, dtype=torch.bfloat16, device=device)
    hf_embeds, hf_mask = inputs_embeds[None], gpu_mask[None, :, None]  # [1, N, H] and [1, N, 1], as HF holds them

    def hf_line():  # transformers' merge line (Qwen2-VL, Qwen2.5-VL, ...): out of place, mask [B, S, 1]
        return hf_embeds.masked_scatter(hf_mask, mm_embeds)

    def hf_line_on():
        with mmt.enabled():  # the switch re-counts the mask to reproduce PyTorch's error: one sync, by design
            return hf_line()

    merges = {
        "index_put (GPU mask)": lambda: mm.merge_multimodal_embeddings(inputs_embeds, mm_embeds, gpu_mask,
                                                                       path="index_put"),
        "index_put (CPU mask, vLLM)": lambda: mm.merge_multimodal_embeddings(inputs_embeds, mm_embeds, cpu_mask,
                                                                             path="index_put"),
        "masked_scatter (GPU mask)": lambda: mm.merge_multimodal_embeddings(inputs_embeds, mm_embeds, gpu_mask,
                                                                            path="masked_scatter"),
        "index_copy (GPU mask, SGLang)": lambda: mm.merge_multimodal_embeddings(inputs_embeds, mm_embeds, gpu_mask,
                                                                                path="index_copy"),
        "ours (GPU mask)": lambda: mm.merge_multimodal_embeddings(inputs_embeds, mm_embeds, gpu_mask),
        "HF merge line, switch off": hf_line,
        "HF merge line, switch on": hf_line_on,
    }

    # A whole transformers forward: the tiny random Qwen2-VL the tests use (fp32, 64 wide), inference.
    from tests.models import tiny_vlms
    model, inputs = tiny_vlms.build("qwen2vl", n_images=2, device=device)

    def forward():
        with torch.inference_mode():
            return model(**inputs)

    def forward_on():
        with mmt.enabled():
            return forward()

    forwards = {"HF forward (tiny Qwen2-VL), switch off": forward, "HF forward (tiny Qwen2-VL), switch on": forward_on}

    for name, fn in (merges | forwards).items():
        record = {"case": name, "kind": "merge" if name in merges else "forward",
                  "sync_sites": sync_sites(fn, device)}
        for queue_ms in QUEUE_MS:
            record[f"queue_{queue_ms:g}ms"] = stall(fn, queue_ms, device, per_ms)
        report.add(record)
        common.log(f"{name:40s} " + "  ".join(
            f"queue {q:g} ms: blocked {record[f'queue_{q:g}ms']['blocked_ms']:7.3f} ms" for q in QUEUE_MS))
    common.clean(device)

    print(f"\nhost blocked in the call (ms), N={n} H={hidden} bf16, behind a queue of")
    print(f"{'case':42s} " + " ".join(f"{f'{q:g} ms':>10}" for q in QUEUE_MS) + "  syncs")
    for record in report.data["records"]:
        cells = [record[f"queue_{q:g}ms"] for q in QUEUE_MS]
        blocked = " ".join(f"{c['blocked_ms']:10.3f}" for c in cells)
        print(f"{record['case']:42s} {blocked}  {cells[-1]['syncs']}")
    print(f"wrote {report.path}")


if __name__ == "__main__":
    main()
