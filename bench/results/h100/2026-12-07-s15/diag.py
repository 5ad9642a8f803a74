"""One case of the one-launch select copy on the GPU, in its own process (an illegal address ends it), in a checkout
of de389b9: python diag.py VERSION N SPINS (VERSION old: f83b19d's kernel, as kernels/old_msc.py; new: the tree's)."""
import sys
import torch
from mmmerge_triton import scatter, workspaces
from mmmerge_triton.kernel_config import KernelConfig
from mmmerge_triton.kernels.scan_state import STATUS
from mmmerge_triton.launch import FastKernel

version, n, spins = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if version == "old":
    from mmmerge_triton.kernels.old_msc import mask_select_copy_kernel
    scatter._mask_select_copy = FastKernel(mask_select_copy_kernel)
dev = torch.device("cuda", 0)
bad = 0
for step, p in enumerate((0.5, 0.05, 0.9)):
    g = torch.Generator(device=dev).manual_seed(step)
    mask = torch.rand(n, generator=g, device=dev) < p
    k = int(mask.sum())
    dense = torch.randn(n, 64, device=dev)
    compact = torch.randn(k, 64, device=dev)
    want = dense.clone()
    want[mask] = compact
    for rep in range(5):
        d = dense.clone()
        scatter.mask_select_copy(d, compact, mask.view(torch.uint8), None, scatter.COPY, KernelConfig(1, 64, 8, 1),
                                 spins=spins)
        torch.cuda.synchronize()
        wrong = int((d != want).any(1).sum())
        bad += wrong > 0
    ws = workspaces.workspace(dev, -(-n // 1024))
    blocks = -(-n // 1024)
    words = ws[STATUS.value: STATUS.value + blocks].cpu()
    counts = torch.nn.functional.pad(mask.to(torch.int64), (0, blocks * 1024 - n)).view(blocks, 1024).sum(1).cpu()
    pub = bool(torch.equal(words & 0xFFFFFFFF, counts))
    print(f"{version} N={n} spins={spins} p={p}: wrong rows in last rep {wrong}, counts published right {pub}")
print(f"{version} N={n} spins={spins}: {'OK' if bad == 0 else f'{bad} of 15 wrong'}")
