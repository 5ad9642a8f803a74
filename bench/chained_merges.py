"""The transformers switch on an omni model's merges: K out-of-place masked_scatter calls, each on the last one's
result (Qwen2.5-Omni and Qwen3-Omni: audio, image, video), run by PyTorch, by the switch one call at a time, and
by the switch in a chained_merges() block (what its enable() does for those models' forwards).

    python bench/chained_merges.py --out DIR [--quick]

Each call is the whole sequence ``y = x.masked_scatter(mask_k, src_k)`` for k = 1..K, as HF writes it (masks
[1, N, 1] bool on the GPU, sources [M_k, H] in x's dtype, disjoint rows in chunks of CHUNK taken in turn), from
the same x every time (x is never written). Figures (timing.interleaved, ROUNDS rounds, medians): device µs
(GPU kept busy before the call; the switch's per-call count syncs, as HF's own count checks do, so its host gaps
after each sync count too), idle µs, loop µs, and peak extra memory (timing.peak_extra_bytes), beside one
clone of x (the N x H copy an out-of-place merge must make) as the floor. Every result is checked against
PyTorch's, bit for bit, before timing.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from mmmerge_triton.integrations import transformers as switch
from mmmerge_triton.tools import timing
from mmmerge_triton.tools.bench import device_name, environment

DEV = torch.device("cuda", 0)
CASES = ((16384, 3584), (65536, 3584), (65536, 5120))  # (N, H); --quick: the first
SHARES = (0.1, 0.3, 0.3)  # audio, image, video: the rows each takes
CHUNK = 64
FIGURES = {
    "device_us": lambda fn: timing.device_time_us(fn, DEV, reps=timing.ROUND_REPS),
    "idle_us": lambda fn: timing.idle_time_us(fn, DEV, reps=5),
    "loop_us": lambda fn: timing.loop_time_us(fn, DEV, budget_s=timing.ROUND_LOOP_S),
}


def inputs(n: int, h: int, dtype=torch.bfloat16) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """x [1, N, H]; masks [1, N, 1], disjoint: the chunks of CHUNK rows go to modality k with probability
    SHARES[k] (the rest stay text); sources [M_k, H]."""
    generator = torch.Generator().manual_seed(n + h)
    owner = torch.multinomial(torch.tensor([*SHARES, 1 - sum(SHARES)]), -(-n // CHUNK), replacement=True,
                              generator=generator).repeat_interleave(CHUNK)[:n]
    masks = [(owner == k).view(1, n, 1).to(DEV) for k in range(len(SHARES))]
    x = torch.randn(1, n, h, generator=generator).to(DEV, dtype)
    sources = [torch.randn(int(m.sum()), h, generator=generator).to(DEV, dtype) for m in masks]
    return x, masks, sources


STOCK = torch.Tensor.masked_scatter  # PyTorch's, taken before the switch is enabled


def sequence(x: torch.Tensor, masks: list[torch.Tensor], sources: list[torch.Tensor], merge=None) -> torch.Tensor:
    """The K merges as HF's omni forwards write them (each result rebinds the embeddings); ``merge``: a
    masked_scatter to call instead of the tensor's."""
    for mask, source in zip(masks, sources):
        x = x.masked_scatter(mask, source) if merge is None else merge(x, mask, source)
    return x


def chained(x, masks, sources) -> torch.Tensor:
    with switch.chained_merges():
        return sequence(x, masks, sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = []
    for n, h in CASES[:1] if args.quick else CASES:
        x, masks, sources = inputs(n, h)
        expected = sequence(x, masks, sources)
        switch.enable()
        try:
            calls = {"PyTorch (switch off)": lambda: sequence(x, masks, sources, STOCK),
                     "switch, one call at a time": lambda: sequence(x, masks, sources),
                     "switch, chained_merges()": lambda: chained(x, masks, sources),
                     "clone of x (floor)": lambda: x.clone()}
            for name in list(calls)[1:3]:
                if not torch.equal(calls[name](), expected):
                    raise SystemExit(f"{name} differs from PyTorch at N={n} H={h}")
            taken = timing.interleaved(calls, FIGURES)
            peak = {name: timing.peak_extra_bytes(fn, DEV) for name, fn in calls.items()}
        finally:
            switch.disable()
        figures = {name: {figure: statistics.median(values) for figure, values in taken[name].items()}
                   | {"peak_extra_mb": None if peak[name] is None else peak[name] / 2**20} for name in calls}
        floor = figures["clone of x (floor)"]
        row = {"n": n, "hidden": h, "rows": [int(m.sum()) for m in masks], "figures": figures,
               "rounds": taken}
        rows.append(row)
        for name, f in figures.items():
            print(f"N={n} H={h} {name:28s} device {f['device_us']:8.1f} µs (x{f['device_us'] / floor['device_us']:.2f}"
                  f" a clone)  idle {f['idle_us']:8.1f}  loop {f['loop_us']:8.1f} µs  peak +{f['peak_extra_mb'] or 0:.0f} MB",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"chained_merges_{device_name(DEV)}.json"
    path.write_text(json.dumps({"environment": environment(DEV), "shares": SHARES, "chunk": CHUNK, "cases": rows},
                               indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
