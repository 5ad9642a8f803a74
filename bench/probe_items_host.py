"""Where the host time of a list merge goes (cProfile), items read in place, on the machine it runs on.
(It probes package internals: dispatch.items_in_place_pays, patched to read every list in place.)

    python bench/probe_items_host.py > probe_items_host.log      (CUDA; bench/results/h100/probe_items_host.log)

Prints, per list shape, the host µs of the list merge against one pre-concatenated tensor and torch.cat alone
(tools.timing.host_time_us), then the profile's top functions; last, the host µs of building a MergePlan from a
CPU mask. The constants of dispatch.items_in_place_pays were read off this and the items suite.
"""
import cProfile
import io
import pstats

import torch

import mmmerge_triton.dispatch as dispatch
from mmmerge_triton import MergePlan, merge_multimodal_embeddings
from mmmerge_triton.tools import timing
from mmmerge_triton.tools.cases import make_mask


def main() -> None:
    dispatch.items_in_place_pays = lambda *args: True  # profile the in-place path whatever the rule says
    dev = torch.device("cuda")
    for count, rows, hidden in [(8, 1024, 3584), (64, 256, 3584), (512, 256, 3584)]:
        m = count * rows
        n = m + m // 4
        mask = make_mask(n, m, "blocks")
        dst = torch.randn(n, hidden, device=dev, dtype=torch.bfloat16)
        items = [torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16) for _ in range(count)]
        cat = torch.cat(items)

        def as_list():
            merge_multimodal_embeddings(dst, items, mask)

        def as_one():
            merge_multimodal_embeddings(dst, cat, mask)

        print(f"items {count}x{rows} H={hidden}: host us list {timing.host_time_us(as_list, dev, 50):.1f} "
              f"single {timing.host_time_us(as_one, dev, 50):.1f} "
              f"cat {timing.host_time_us(lambda: torch.cat(items), dev, 50):.1f}")
        for _ in range(5):
            as_list()
        torch.cuda.synchronize()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(100):
            as_list()
        profile.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(16)
        print(out.getvalue()[-3500:])
    n = 2048
    mask = make_mask(n, n // 2, "blocks")
    print("plan build host us (cpu mask, N=2048):", timing.host_time_us(lambda: MergePlan(mask, device=dev), dev, 50))


if __name__ == "__main__":
    main()
