"""Deepstack: Qwen3-VL's three injections of visual features, vLLM's dense buffers against the sparse plan.

Qwen3-VL's vision tower returns, per visual token, the main features and 3 deepstack levels: [K, 4·H]. The
language model adds level l to the hidden states of the visual rows after decoder layer l (l = 0, 1, 2).

vLLM (qwen3_vl.py, _compute_deepstack_embeds and Qwen3LLMModel.forward), per forward of N tokens:
  buffer = new_zeros(N, 3·H); buffer[is_multimodal] = levels       index_put with the CPU mask
  persistent[l][:N].copy_(buffer.view(N, 3, H)[:, l])              3 resident [max_tokens, H] buffers
  hidden = hidden + persistent[l][:N]                              after layer l: a dense add over all N rows
  persistent[l][:N].zero_()                                        after the forward (_clear_deepstack_input_embeds)
Sparse (this package): plan = MergePlan(is_multimodal), then deepstack_add(hidden, levels[l], plan) after
layer l: one accumulate launch over the K visual rows, in place.

Bytes that must move (bf16, 2 B; K = N/2 visual rows):
  dense:  zeros 3NH + index_put 2·3KH + copy 2·3NH + adds 3·3NH + clear 3NH = (21NH + 6KH)·2 B = 48·N·H B
  sparse: per layer read src KH + read dst KH + write dst KH, 3 layers      = 9KH·2 B           =  9·N·H B
Peak extra memory: dense 3NH·2 B (the zero buffer) + K int64 indices + one new [N, H] per out-of-place add,
plus the resident 3·max_tokens·H·2 B (reported apart: allocated at start-up, here with max_tokens = N);
sparse: the row map, 4·N B. Times from the package's timing module: device time (GPU, L2 flushed, no host
gaps) and loop time (wall per call back to back).

    python bench/matters/deepstack.py --out OUT     # H100: about 10 s
    python bench/matters/deepstack.py --smoke       # CPU
"""
from __future__ import annotations

import torch

import common
import mmmerge_triton as mm

LEVELS = 3


def main() -> None:
    args = common.arguments(__doc__)
    device = common.device_for(args)
    shapes = [(16384, 4096), (65536, 4096)] if not args.smoke else [(512, 64)]
    report = common.Report(args, "deepstack", device, {
        "shapes": shapes, "levels": LEVELS, "dtype": "bf16", "visual_fraction": 0.5, "pattern": "blocks",
        "mask": "cpu (vLLM's)", "bytes_moved": {"dense": "(21*N*H + 6*K*H) * 2", "sparse": "9*K*H * 2"}})

    for n, hidden in shapes:
        k = n // 2
        mask = common.make_mask(n, k, "blocks")  # on the CPU, as vLLM holds is_multimodal
        hidden_states = torch.randn(n, hidden, dtype=torch.bfloat16, device=device)  # a decoder layer's output
        visual = torch.randn(k, (1 + LEVELS) * hidden, dtype=torch.bfloat16, device=device)  # main + 3 levels
        levels = visual[:, hidden:]  # [K, 3H], a view: how vLLM splits it off
        persistent = [torch.zeros(n, hidden, dtype=torch.bfloat16, device=device) for _ in range(LEVELS)]

        def dense():  # vLLM
            buffer = hidden_states.new_zeros(n, LEVELS * hidden)
            buffer[mask] = levels
            by_level = buffer.view(n, LEVELS, hidden).permute(1, 0, 2)
            for level in range(LEVELS):
                persistent[level][:n].copy_(by_level[level])
            del buffer, by_level
            out = hidden_states
            for level in range(LEVELS):  # (the decoder layer l runs here)
                out = out + persistent[level][:n]
            for level in range(LEVELS):
                persistent[level][:n].zero_()
            return out

        def sparse():  # ours, in place (inference)
            plan = mm.MergePlan(mask, device=device)
            for level in range(LEVELS):  # (the decoder layer l runs here)
                mm.deepstack_add(hidden_states, levels[:, level * hidden:(level + 1) * hidden], plan)
            return hidden_states

        # Same result first (the sparse one on a copy, since it writes in place).
        expected = dense()
        saved = hidden_states.clone()
        got = sparse()
        torch.testing.assert_close(got.float(), expected.float(), rtol=0.02, atol=0.05)  # bf16, added in another order
        hidden_states.copy_(saved)
        del expected, saved, got

        moved = {"dense": (21 * n * hidden + 6 * k * hidden) * 2, "sparse": 9 * k * hidden * 2}
        record = {"n": n, "hidden": hidden, "visual_rows": k, "levels": LEVELS,
                  "resident_bytes": {"dense": LEVELS * n * hidden * 2, "sparse": 0}, "moved_bytes": moved}
        for name, fn in (("dense", dense), ("sparse", sparse)):
            device_us = common.timing.device_time_us(fn, device)
            record[name] = {"device_us": device_us, "loop_us": common.timing.loop_time_us(fn, device),
                            "peak_extra_bytes": common.timing.peak_extra_bytes(fn, device),
                            "effective_gb_s": moved[name] / device_us / 1e3}
            common.clean(device)
        report.add(record)
        d, s = record["dense"], record["sparse"]
        peak = [x["peak_extra_bytes"] for x in (d, s)]
        common.log(f"N={n} H={hidden}: device {d['device_us']:.0f} / {s['device_us']:.0f} µs, loop "
                   f"{d['loop_us']:.0f} / {s['loop_us']:.0f} µs, peak extra "
                   + (f"{peak[0] / common.MB:.0f} / {peak[1] / common.MB:.1f} MB" if None not in peak else "n/a")
                   + " (dense vLLM / sparse ours)")
        del hidden_states, visual, levels, persistent
        common.clean(device)
    print(f"wrote {report.path}")


if __name__ == "__main__":
    main()
