"""The host path from many threads at once, with the launch replaced by a check of what it is handed: each launch
must get its own call's addresses, sizes and row layout, through first calls, memo hits and a memo emptied again
and again while the threads use it. (tests/gpu/test_threads.py runs the kernels themselves, on a GPU.)"""
from __future__ import annotations

import random
import threading

import torch

import mmmerge_triton as mt
from mmmerge_triton import core, executor

THREADS, CALLS = 6, 150
PAIRS = ((torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16))


class Call:
    """One merge of random shape, dtypes, layout and entry point, and what dst must hold after it."""

    def __init__(self, rng: random.Random):
        n, h = rng.choice((8, 40, 300, 1000)), rng.choice((4, 16, 48))
        src_dtype, dst_dtype = rng.choice(PAIRS)
        gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
        self.batched = rng.random() < 0.25  # a [2, N/2, H] dst and its [2, N/2] mask: signed as their rows
        wide = rng.random() < 0.25  # rows further apart than H: a row stride of its own
        base = torch.randn(n, h + (8 if wide else 0), generator=gen).to(dst_dtype)
        self.dst = base[:, :h] if wide else base
        if self.batched:
            self.dst = self.dst.contiguous().view(2, n // 2, h)
        self.mask = torch.rand(self.dst.shape[:-1], generator=gen) < rng.choice((0.0, 0.3, 1.0))
        m = int(self.mask.sum())
        self.src = torch.randn(m, h, generator=gen).to(src_dtype)
        self.accumulate = rng.random() < 0.5
        self.entry = rng.choice(("masked_row_scatter_", "merge_multimodal_embeddings"))
        if self.entry == "merge_multimodal_embeddings":
            self.accumulate = False
        self.expected = self.dst.clone()
        self.expected.view(-1, h).index_put_((self.mask.reshape(-1),), self.src.to(dst_dtype),
                                             accumulate=self.accumulate)

    def run(self) -> None:
        if self.entry == "masked_row_scatter_":
            mt.masked_row_scatter_(self.dst, self.mask, self.src, accumulate=self.accumulate, path="triton")
        else:
            mt.merge_multimodal_embeddings(self.dst, self.src, self.mask, path="triton")


def test_threads_hand_each_launch_its_own_call(monkeypatch):
    monkeypatch.setattr(core, "_MAX_ENTRIES", 4)  # the memo emptied under the threads, over and over
    current = threading.local()
    launches = []

    def launch(launch, dst, mask, src, accumulate, at, layout):
        call = current.call
        assert dst.data_ptr() == call.dst.data_ptr() and mask.data_ptr() == call.mask.data_ptr()
        assert torch.equal(src, call.src) and accumulate == call.accumulate
        assert at == (mask.data_ptr(), dst.data_ptr(), src.data_ptr(), dst.shape[0], src.shape[0])
        assert layout == (dst.shape[1], dst.stride(0), src.stride(0))
        dst.index_put_((mask,), src.to(dst.dtype), accumulate=accumulate)
        launches.append(1)

    monkeypatch.setattr(executor, "_launch", launch)
    errors, wrong = [], []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(CALLS):
                call = current.call = Call(rng)
                call.run()
                if not torch.equal(call.dst, call.expected):
                    wrong.append(f"thread {seed} call {i}: {call.entry} {tuple(call.dst.shape)}")
        except Exception as error:  # noqa: BLE001 - every exception is a failure
            errors.append(f"thread {seed}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == [], (errors[:5], wrong[:5])
    assert len(launches) >= THREADS * CALLS // 2  # most calls launched (the empty ones return before)
