"""Host time of a memo hit with the kernel launch replaced by a no-op, on a CPU (no GPU needed): what the Python
path of a prepared call costs, for this checkout or an earlier package put first on the path.

    python bench/host_memo_hit.py                          # this checkout
    PYTHONPATH=.before python bench/host_memo_hit.py       # an earlier package (git archive REV mmmerge_triton
                                                           # kernels | tar -x -C .before)

merge_multimodal_embeddings and masked_row_scatter_ with path="triton" on a CPU mask (N = 4096, H = 64, half the
rows), CPU tensors under TRITON_INTERPRET=1 with the launch stubbed (executor._launch; lean.execute in a package
before the one-route redesign, 52753c3). Prints the median and the least of 7 rounds of 20000 calls, in µs per
call. Run the versions alternately, several times: the development host is shared.
"""
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import mmmerge_triton as mm  # noqa: E402

if os.path.exists(os.path.join(os.path.dirname(mm.__file__), "lean.py")):  # before the one-route redesign
    from mmmerge_triton import lean  # noqa: E402
    lean.execute = lambda *args, **kwargs: None
else:
    from mmmerge_triton import executor  # noqa: E402
    executor._launch = lambda *args, **kwargs: None

N, H = 4096, 64
dst = torch.zeros(N, H)
mask = torch.zeros(N, dtype=torch.bool)
mask[::2] = True
src = torch.randn(int(mask.sum()), H)
print(mm.__file__, mm.explain(dst, src, mask, path="triton").kind)
calls = {"merge_multimodal_embeddings": lambda: mm.merge_multimodal_embeddings(dst, src, mask, path="triton"),
         "masked_row_scatter_": lambda: mm.masked_row_scatter_(dst, mask, src, path="triton")}
for name, call in calls.items():
    for _ in range(2000):  # the first call prepares; the rest are memo hits
        call()
    rounds = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(20000):
            call()
        rounds.append((time.perf_counter() - start) / 20000 * 1e6)
    print(f"{name}: {statistics.median(rounds):.2f} µs (least {min(rounds):.2f})")
