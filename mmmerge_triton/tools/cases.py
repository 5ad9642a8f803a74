"""Benchmark and tuning cases: shapes, dtypes, mask layouts, and the inputs built from them (seeded)."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One merge: N rows of H, a fraction ``density`` of them multimodal, laid out as ``pattern``
    ("blocks": a few contiguous image spans, as real prompts; "scattered": uniformly random rows)."""

    n: int
    hidden: int
    density: float
    pattern: str = "blocks"
    src: str = "bf16"
    dst: str = "bf16"
    mask: str = "cpu"  # where the mask lives: "cpu" or "gpu" (the merge's device)

    @property
    def rows(self) -> int:
        """M: the multimodal rows."""
        return round(self.density * self.n)

    @property
    def moved_bytes(self) -> int:
        """What a merge must move: read M*H source elements, write M*H destination elements."""
        size = {"fp32": 4, "fp16": 2, "bf16": 2}
        return self.rows * self.hidden * (size[self.src] + size[self.dst])

    def label(self) -> str:
        return (f"N={self.n} H={self.hidden} {self.density:.0%} {self.pattern} {self.src}->{self.dst} "
                f"mask={self.mask}")

    def as_dict(self) -> dict:
        return asdict(self)


def make_mask(n: int, rows: int, pattern: str, seed: int = 0) -> torch.Tensor:
    """A CPU bool mask [n] with exactly ``rows`` true entries."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, dtype=torch.bool)
    if rows == 0:
        return mask
    if pattern == "scattered":
        mask[torch.randperm(n, generator=gen)[:rows]] = True
        return mask
    blocks = max(1, min(8, rows // 64))  # a few images of at least 64 tokens each
    sizes = [rows // blocks + (i < rows % blocks) for i in range(blocks)]
    gaps = (n - rows) // (blocks + 1)
    position = gaps
    for size in sizes:
        mask[position:position + size] = True
        position += size + gaps
    return mask


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """(dst [N, H], mask [N] on the case's mask device, src [M, H]), random normal values."""
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: GBs at the largest cases
    mask = make_mask(case.n, case.rows, case.pattern, seed)
    dst = torch.randn(case.n, case.hidden, generator=gen, device=device, dtype=DTYPES[case.dst])
    src = torch.randn(case.rows, case.hidden, generator=gen, device=device, dtype=DTYPES[case.src])
    if case.mask == "gpu":
        mask = mask.to(device)
    return dst, mask, src


HIDDEN = (1024, 2048, 3584, 4096, 5120, 8192)


def grid(name: str, device: torch.device) -> list[Case]:
    """The benchmark grids. "full" on a GPU: every N x H at the serving case (bf16, half the rows in image
    blocks, CPU mask), then densities and layouts, dtype pairs and GPU masks at chosen shapes. "quick": a
    handful of cases, under a minute on a 2-core CPU."""
    gpu = device.type == "cuda"
    if name == "quick":
        ns = (256, 2048, 16384)
        hs = (2048, 4096) if gpu else (1024, 4096)
        cases = [Case(n, h, 0.5) for n, h in itertools.product(ns, hs)]
        if gpu:
            cases += [Case(16384, 4096, 0.5, mask="gpu"), Case(16384, 4096, 0.5, src="fp32")]
        return cases
    ns = (256, 1024, 4096, 16384, 65536) + ((131072,) if gpu else ())
    cases = [Case(n, h, 0.5) for n, h in itertools.product(ns, HIDDEN if gpu else (1024, 4096))]
    shapes = ((2048, 4096), (16384, 4096), (65536, 5120)) if gpu else ((2048, 1024),)
    for (n, h), density, pattern in itertools.product(shapes, (0.05, 0.5, 0.9), ("blocks", "scattered")):
        if (density, pattern) != (0.5, "blocks"):
            cases.append(Case(n, h, density, pattern))
    for (n, h), (src, dst) in itertools.product(shapes, (("fp32", "bf16"), ("fp16", "fp16"), ("fp32", "fp16"),
                                                          ("fp32", "fp32"))):
        cases.append(Case(n, h, 0.5, src=src, dst=dst))
    if gpu:
        for n, h in itertools.product(ns, (2048, 5120)):
            cases.append(Case(n, h, 0.5, mask="gpu"))
        cases += [Case(16384, 4096, 0.9, "scattered", mask="gpu"), Case(65536, 5120, 0.05, mask="gpu"),
                  Case(16384, 4096, 0.5, src="fp32", mask="gpu")]
    return cases
