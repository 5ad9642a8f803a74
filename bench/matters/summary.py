"""The README's "When it matters" tables, drawn from the JSONs of bench/matters/ (run.sh writes them).

    python bench/matters/summary.py OUT                     # Markdown to stdout
    python bench/matters/summary.py OUT --readme README.md  # also fill README's <!-- matters:NAME --> blocks

Each table is one function of one JSON; a missing or partial JSON (a run cut short) gives what it holds.
Every ratio is taken within one file (one run, one card).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

MB, GB = 1e6, 1e9


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def source(data: dict) -> str:
    e = data["environment"]
    return (f"*{data['benchmark']}.json: {e['device'].replace('_', ' ')}, torch {e['torch']}, Triton {e['triton']}, "
            f"transformers {e.get('transformers')}, commit {e.get('commit')}, {e.get('date', '')[:10]}"
            + (" — smoke run on the CPU, not a measurement" if data.get("smoke") else "") + "*")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(x) -> str:
    return "–" if x is None else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def step_share(data: dict) -> str:
    """Step time and peak memory, switch off/on, and the merge's share of the step."""
    rows = []
    for r in data["records"]:
        steps = [("training step (eager)", r["train"], r["merge_train"]),
                 ("prefill (eager)", r["prefill"], r["merge_forward"])]
        steps += [("training step (layers compiled)", c["train"], r["merge_train"])
                  for c in data.get("compiled", {}).get("records", []) if c["n"] == r["n"] and "train" in c]
        for name, step, merge in steps:
            stock, switch = step["stock"], step["switch"]
            peak = (f"{stock['peak_bytes'] / GB:.1f} / {switch['peak_bytes'] / GB:.1f}"
                    if stock["peak_bytes"] is not None else "–")
            rows.append([f"{r['n']:,}", name, f"{ms(stock['ms'])} / {ms(switch['ms'])}",
                         f"{(switch['ms'] / stock['ms'] - 1):+.1%}", peak,
                         f"{ms(merge['stock']['ms'])} / {ms(merge['switch']['ms'])}",
                         f"{merge['stock']['ms'] / stock['ms']:.2%} / {merge['switch']['ms'] / switch['ms']:.2%}"])
    out = [table(["N tokens", "step", "ms stock / switch", "switch vs stock", "peak GB stock / switch",
                  "merge alone ms stock / switch", "merge's share stock / switch"], rows)]
    merge_rows = []
    for r in data["records"]:
        f, t = r["merge_forward"], r["merge_train"]
        peak = [x.get("peak_extra_bytes") for x in (f["stock"], f["switch"], f["ours_direct"], t["stock"], t["switch"])]
        forward_ms = " / ".join(ms(f[k]["ms"]) for k in ("stock", "switch", "ours_direct"))
        merge_rows.append([f"{r['n']:,}", forward_ms,
                           " / ".join("–" if f[k].get("device_us") is None else f"{f[k]['device_us']:.0f}"
                                      for k in ("stock", "switch", "ours_direct")),
                           " / ".join("–" if p is None else f"{p / MB:.0f}" for p in peak[:3]),
                           f"{ms(t['stock']['ms'])} / {ms(t['switch']['ms'])}",
                           " / ".join("–" if p is None else f"{p / MB:.0f}" for p in peak[3:]),
                           f"{r.get('vision_ms', 0):.1f}"])
    out.append(table(["N tokens", "merge forward ms stock / switch / ours direct", "device µs", "peak extra MB",
                      "merge forward + backward ms stock / switch", "peak extra MB", "vision tower ms"], merge_rows))
    skipped = [f"N={c['n']}: {c.get('skipped') or c.get('error')}" for c in data.get("compiled", {}).get("records", [])
               if "train" not in c]
    if data.get("compiled", {}).get("skipped"):
        skipped.append(data["compiled"]["skipped"])
    firsts = [f"N={c['n']}: {c['first_call_s']} s" for c in data.get("compiled", {}).get("records", []) if "train" in c]
    notes = []
    if firsts:
        notes.append("Compiled: first call (compile) " + ", ".join(firsts) + ".")
    if skipped:
        notes.append("Not compiled: " + "; ".join(skipped) + ".")
    equal = all(v.get("output_equal") in (True, None) for r in data["records"]
                for part in ("train", "prefill", "merge_forward") for v in r[part].values())
    routed = sorted({r.get("switch_routed_merges") for r in data["records"]})
    notes.append(f"Loss, logits and merged embeddings bit-identical with the switch on: {equal}. "
                 f"Merges the switch routed per forward: {routed}.")
    s = data["settings"]
    lm = s["language_model"]
    head = (f"Qwen2-VL, random weights, bf16: language model hidden {lm['hidden']}, intermediate {lm['intermediate']}, "
            f"{lm['heads']} heads / {lm['kv_heads']} KV, vocab {lm['vocab']}, {lm['layers']} layers; "
            "tiny vision tower; "
            f"half the tokens visual ({s['image_tokens']} per image). Median of {s['reps']} after a warm-up, "
            "wall time synchronized.")
    return "\n\n".join([head] + out + [" ".join(notes), source(data)])


def headroom(data: dict) -> str:
    """Largest N per path and margin; peak extra memory at one N."""
    found = {(r["path"], r["margin_gib"], r["hidden"]): r for r in data["records"] if r["kind"] == "largest_n"}
    paths = list(data["settings"]["paths"])
    keys = sorted({(m, h) for _, m, h in found})
    rows = []
    for m, h in keys:
        n = {p: found[p, m, h]["largest_n"] for p in paths if (p, m, h) in found}
        free = next(iter(found[p, m, h] for p in paths if (p, m, h) in found))["margin_free_bytes"]
        base = n.get(paths[0])
        rows.append([f"{m} GiB", h, f"{free // (3 * h):,}"] +
                    [f"{n[p]:,}" + (f" ({n[p] / base:.1f}x)" if base and p != paths[0] else "") if p in n else "–"
                     for p in paths])
    out = [table(["free margin", "H", "inputs alone fit to N"] + paths, rows)]
    peaks = [r for r in data["records"] if r["kind"] == "peak"]
    if peaks:
        out.append(table(["path", f"peak extra MB at N={peaks[0]['n']:,}, H={peaks[0]['hidden']}",
                          "bytes per element of inputs_embeds"],
                         [[r["path"], "–" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / MB:.1f}",
                           "–" if r["per_element_of_dst"] is None else f"{r['per_element_of_dst']:.2f}"]
                          for r in peaks]))
    head = ("Largest prompt N (tokens, half visual, bf16) each path merges when a KV-cache-like allocation leaves the "
            "given margin free; in brackets, against masked_scatter. Counted against the margin: "
            + data["settings"]["counted"] + ".")
    return "\n\n".join([head] + out + [source(data)])


def stalls(data: dict) -> str:
    """Host blocked in the call behind 5 and 20 ms of queued GPU work."""
    queues = data["settings"]["queue_ms"]
    rows, sites = [], []
    for r in data["records"]:
        cells = [r.get(f"queue_{q:g}ms") for q in queues]
        rows.append([r["case"]] + [ms(c["blocked_ms"]) for c in cells] + [ms(cells[-1]["next_step_ms"]),
                    ms(cells[-1]["done_ms"]), {True: "yes", False: "no", None: "–"}[cells[-1]["syncs"]]])
        if r["sync_sites"]:
            sites.append(f"- {r['case']}: " + "; ".join(f"`{s}`" for s in r["sync_sites"]))
    s = data["settings"]
    head = (f"A merge with a GPU mask (N={s['n']:,}, H={s['hidden']}, bf16, half visual) called behind a queue of "
            f"GPU work ({', '.join(f'{q:g}' for q in queues)} ms of a spin kernel). Medians of {s['reps']}, ms.")
    out = table(["case"] + [f"host blocked, {q:g} ms queued" for q in queues]
                + [f"next host step issued ({queues[-1]:g} ms)", f"GPU done ({queues[-1]:g} ms)", "syncs"], rows)
    parts = [head, out]
    if sites:
        parts.append("Where each case synchronizes (`torch.cuda.set_sync_debug_mode`):\n" + "\n".join(sites))
    return "\n\n".join(parts + [source(data)])


def deepstack(data: dict) -> str:
    """vLLM's dense deepstack buffers against the sparse plan."""
    rows = []
    for r in data["records"]:
        d, s = r["dense"], r["sparse"]
        peak = lambda x: "–" if x["peak_extra_bytes"] is None else f"{x['peak_extra_bytes'] / MB:.1f}"  # noqa: E731
        rows.append([f"{r['n']:,}, {r['hidden']}",
                     f"{d['device_us']:.0f} / {d['loop_us']:.0f} / {peak(d)} + {r['resident_bytes']['dense'] / MB:.0f}",
                     f"{s['device_us']:.0f} / {s['loop_us']:.0f} / {peak(s)} + 0",
                     f"{d['device_us'] / s['device_us']:.1f}x / {d['loop_us'] / s['loop_us']:.1f}x",
                     f"{r['moved_bytes']['dense'] / MB:.0f} / {r['moved_bytes']['sparse'] / MB:.0f}"])
    head = ("Qwen3-VL's 3 deepstack injections per forward, half the rows visual, bf16, vLLM's CPU mask. Device µs "
            "(GPU, L2 flushed) / loop µs (wall per call back to back) / peak extra MB + resident MB (vLLM keeps 3 "
            "[max_tokens, H] buffers, here max_tokens = N).")
    return "\n\n".join([head, table(["N, H", "dense buffers (vLLM)", "sparse plan (ours)",
                                     "ours faster, device / loop", "MB that must move, dense / sparse"], rows),
                        source(data)])


SECTIONS = {"step_share": step_share, "headroom": headroom, "stalls": stalls, "deepstack": deepstack}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--readme", type=Path, help="fill its <!-- matters:NAME --> ... <!-- /matters:NAME --> blocks")
    args = parser.parse_args()
    drawn = {}
    for name, draw in SECTIONS.items():
        data = load(args.folder, name)
        if data is None or not data.get("records"):
            drawn[name] = f"*{name}: no results in {args.folder}*"
            continue
        try:
            drawn[name] = draw(data)
        except (KeyError, TypeError, ZeroDivisionError) as error:  # a run cut short mid-record
            drawn[name] = f"*{name}: incomplete results ({type(error).__name__}: {error})*"
    for name, text in drawn.items():
        print(f"\n### {name}\n\n{text}\n")
    if args.readme:
        readme = args.readme.read_text()
        for name, text in drawn.items():
            readme = re.sub(rf"(<!-- matters:{name} -->).*?(<!-- /matters:{name} -->)",
                            lambda m: f"{m.group(1)}\n{text}\n{m.group(2)}", readme, flags=re.S)
        args.readme.write_text(readme)


if __name__ == "__main__":
    main()
