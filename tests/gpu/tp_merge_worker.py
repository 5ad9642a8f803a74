"""One rank of a tensor-parallel prefill merge (run by test_tensor_parallel.py under torchrun, 2+ GPUs).

Every rank embeds the same prompt; the vision features are split across ranks and all-gathered; each rank
merges on its own GPU, with a CPU mask (items read in place) and a GPU mask, with no sync in the merge. Both
must equal a single-GPU reference, on every rank.
"""
import os

import torch
import torch.distributed as dist

import mmmerge_triton as mm
from mmmerge_triton.tools.cases import make_mask


def main() -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    n, hidden = 4096, 1024
    mask = make_mask(n, n // 2, "blocks")
    gen = torch.Generator().manual_seed(0)  # the same prompt and features on every rank
    embeds = torch.randn(n, hidden, generator=gen).to(device, torch.bfloat16)
    features = torch.randn(n // 2, hidden, generator=gen).to(device, torch.bfloat16)
    local = features.chunk(world)[rank].contiguous()  # this rank's share of the vision encoder's output
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    gpu_mask = mask.to(device)
    by_cpu_mask, by_gpu_mask = embeds.clone(), embeds.clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mm.merge_multimodal_embeddings(by_cpu_mask, gathered, mask)
        mm.merge_multimodal_embeddings(by_gpu_mask, torch.cat(gathered), gpu_mask)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    reference = embeds.clone()
    reference[gpu_mask] = features
    assert torch.equal(by_cpu_mask, reference), f"rank {rank}: CPU-mask merge differs from the reference"
    assert torch.equal(by_gpu_mask, reference), f"rank {rank}: GPU-mask merge differs from the reference"
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
