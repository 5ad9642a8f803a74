#!/usr/bin/env python
"""Memory-safety run of every kernel and mode of mmmerge_triton on small shapes (not a pytest file).

On the GPU machine:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python tests/gpu/sanitize.py

(without the caching allocator every tensor is its own allocation, so memcheck sees an access one element
past a tensor). It also checks every result against torch, so without the sanitizer it is a quick
correctness run (well under a minute of GPU work). Covered: row_copy_kernel in COPY/ADD/GATHER with
row maps whose count is below and above M (and maps only as long as their count), the fused
mask_row_copy_kernel, mask_block_counts_kernel + mask_select_copy_kernel (no row map), and the two-pass
mask_to_rows_kernel + row_copy_kernel (the map scanned in one launch or counted in two, mask_block_counts_kernel
first) with device masks whose true rows K differ from M both ways
(no host check: the kernels alone must stay in bounds), N=1, H=1, odd H,
empty and full masks, CPU-mask staging (many calls, and a row map larger than an arena quarter), plans,
the backward (GATHER), misaligned and strided views, every dtype pair, merge_requests with items at odd
addresses and with a lone item of dst's own rows. Cases that hit a suspected package bug (device masks whose
flattened view is strided or expanded) run last, so a fault there cannot hide the others. Prints
"sanitize: N cases run" (and the failures); exits 1 if any case failed.
"""
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from mmmerge_triton.scatter import device_rows  # noqa: E402

RAN = 0
FAILURES = []


def case(name, fn):
    global RAN
    RAN += 1
    try:
        fn()
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - every failure is reported, the run goes on
        FAILURES.append(name)
        print(f"FAIL {name}: {type(error).__name__}: {error}", file=sys.stderr)
        traceback.print_exc(limit=3, file=sys.stderr)


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize: CUDA is not available, 0 cases run")
        return 2

    import mmmerge_triton as mt
    import mmmerge_triton.api

    mmmerge_triton.dispatch.items_in_place_pays = lambda *args: True  # lists through the multi-item kernel
    from mmmerge_triton import executor, scatter
    from mmmerge_triton.kernel_config import KernelConfig

    from gpu_helpers import DTYPE_PAIRS, assert_same, dev, first_true, pair_id, rand, random_mask, reference

    DEV = dev()
    CFG = KernelConfig(4, 32, 4, 1, False)  # small tiles: H=33 and H=130 have column tails
    CFG_FUSED = CFG._replace(fused=True)

    def merge(kind, dst, mask_cpu, src, acc, cfg=CFG):
        """Run one merge with a mask of ``kind`` (no host-side count check for device masks)."""
        if kind == "cpu":
            executor.merge_triton(dst, mask_cpu, src, acc, config=cfg)
        elif kind == "fused":
            executor.merge_triton(dst, mask_cpu.to(DEV), src, acc, config=cfg._replace(fused=True))
        elif kind == "select":  # the two-launch kind as shipped under SELECT_BELOW rows: no row map
            executor.merge_triton(dst, mask_cpu.to(DEV), src, acc, config=cfg._replace(fused=False))
        elif kind in ("two_pass", "counted"):  # through the row map (SELECT_BELOW lowered), scanned in two levels
            # at any N for "counted" (COUNTED_FROM lowered)
            saved = scatter.SELECT_BELOW, scatter.COUNTED_FROM
            scatter.SELECT_BELOW, scatter.COUNTED_FROM = 0, 1 if kind == "counted" else saved[1]
            try:
                executor.merge_triton(dst, mask_cpu.to(DEV), src, acc, config=cfg._replace(fused=False))
            finally:
                scatter.SELECT_BELOW, scatter.COUNTED_FROM = saved
        elif kind == "plan":
            plan = mt.MergePlan(mask_cpu.to(DEV))
            executor.merge_triton(dst, plan.mask, src, acc, rowmap=plan.rowmap, config=cfg)
        elif kind == "plan_cpu":
            plan = mt.MergePlan(mask_cpu, device=DEV)
            executor.merge_triton(dst, mask_cpu, src, acc, rowmap=plan.rowmap, config=cfg)
        elif kind == "api":
            mt.masked_row_scatter_(dst, mask_cpu.to(DEV), src, accumulate=acc, path="triton")
        else:
            raise AssertionError(kind)

    def expected_mismatch(dst, mask, src, acc):
        j = min(int(mask.sum()), src.shape[0])
        return reference(dst, first_true(mask, j), src[:j], acc)

    # A. every dtype pair x shapes (N=1, H=1, odd H) x copy/add x every kernel
    for pair in DTYPE_PAIRS:
        for n, h, m in [(1, 1, 1), (7, 33, 3), (64, 130, 40)]:
            for acc in (False, True):
                for kind in ("cpu", "fused", "select", "two_pass", "counted"):
                    def run(pair=pair, n=n, h=h, m=m, acc=acc, kind=kind):
                        mask = random_mask((n,), m, seed=n + h)
                        dst = rand((n, h), pair[1], seed=1)
                        src = rand((m, h), pair[0], seed=2)
                        expected = reference(dst, mask, src, acc)
                        merge(kind, dst, mask, src, acc)
                        assert_same(dst, expected)
                    case(f"A {pair_id(pair)} N{n} H{h} M{m} {'add' if acc else 'copy'} {kind}", run)

    # B. device masks whose true rows K differ from M, both ways; empty and full masks
    shapes_b = [(50, 20, 30), (50, 30, 20), (5000, 3000, 1000), (5000, 1000, 3000), (20, 0, 5), (20, 20, 3),
                (20, 20, 20), (1, 1, 4), (1, 0, 1), (17000, 9000, 100), (17000, 100, 9000), (40000, 3000, 900),
                (40000, 900, 3000)]
    for pair in [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]:
        for n, k, m in shapes_b:
            for acc in (False, True):
                for kind in ("fused", "select", "two_pass", "counted", "plan", "api"):
                    def run(pair=pair, n=n, k=k, m=m, acc=acc, kind=kind):
                        mask = random_mask((n,), k, seed=n + k + m)
                        dst = rand((n, 40), pair[1], seed=3)
                        src = rand((m, 40), pair[0], seed=4)
                        expected = expected_mismatch(dst, mask, src, acc)
                        merge(kind, dst, mask, src, acc)
                        assert_same(dst, expected)
                    case(f"B {pair_id(pair)} N{n} K{k} M{m} {'add' if acc else 'copy'} {kind}", run)

    # C. row_copy through explicit row maps: every mode, count None / below M / above M, tight maps
    for dense_dt, compact_dt in [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)]:
        for mode in (scatter.COPY, scatter.ADD, scatter.GATHER):
            for count_kind in ("none", "below", "below_tight", "above", "zero", "zero_tight"):
                for cfg in (CFG, KernelConfig(1, 16, 4, 1, False)):
                    def run(dense_dt=dense_dt, compact_dt=compact_dt, mode=mode, count_kind=count_kind, cfg=cfg):
                        n, h, m = 60, 37, 25
                        k = {"none": m, "below": 9, "below_tight": 9, "above": 40, "zero": 0, "zero_tight": 0}[
                            count_kind]
                        moved = min(k, m)
                        perm = torch.randperm(n, generator=torch.Generator().manual_seed(5))[:max(k, m)]
                        length = max(k, 1) if count_kind.endswith("tight") else m
                        rows_host = torch.full((length,), 2 ** 30, dtype=torch.int32)  # junk: out of bounds
                        rows_host[:min(length, moved)] = perm[:min(length, moved)].to(torch.int32)
                        rows = rows_host.to(DEV)
                        count = None if count_kind == "none" else torch.tensor([k], dtype=torch.int32, device=DEV)
                        dense = rand((n, h), dense_dt, seed=6)
                        compact = rand((m, h), compact_dt, seed=7)
                        idx = perm[:moved].to(DEV)
                        exp_dense, exp_compact = dense.clone(), compact.clone()
                        if mode == scatter.COPY:
                            exp_dense[idx] = compact[:moved].to(dense_dt)
                        elif mode == scatter.ADD:
                            exp_dense[idx] = (dense[idx].float() + compact[:moved].to(dense_dt).float()).to(dense_dt)
                        else:
                            exp_compact[:moved] = dense[idx].to(compact_dt)
                        scatter.row_copy(dense, compact, rows, count, mode, cfg)
                        assert_same(dense, exp_dense, "dense")
                        assert_same(compact, exp_compact, "compact")
                    case(f"C dense {dense_dt} compact {compact_dt} mode {mode} count {count_kind} {cfg}", run)

    # D. the gather_rows helper with maps of a device mask whose count is below and above M
    for n, k, m in [(100, 30, 50), (100, 50, 30), (100, 0, 10)]:
        def run(n=n, k=k, m=m):
            mask = random_mask((n,), k, seed=8)
            plan = mt.MergePlan(mask.to(DEV))
            dense = rand((n, 24), torch.bfloat16, seed=9)
            moved = min(k, m)
            rows_used = first_true(mask, moved).to(DEV)
            out = scatter.gather_rows(dense, plan.rows, plan.count, m, torch.float32, CFG)
            exp = torch.zeros(m, 24, device=DEV)
            exp[:moved] = dense[rows_used].float()
            assert_same(out, exp, "gather_rows")
        case(f"D gather N{n} K{k} M{m}", run)

    # E. the empty cases the host skips, launched directly
    def run_empty():
        dst = rand((10, 16), torch.float32, seed=10)
        before = dst.clone()
        none = torch.zeros(10, dtype=torch.bool)
        for kind in ("cpu", "fused", "select", "two_pass", "plan"):
            merge(kind, dst, none, rand((0, 16), torch.float32, seed=11), False)
        scatter.mask_to_rows(torch.zeros(0, dtype=torch.uint8, device=DEV),
                             torch.empty(1, dtype=torch.int32, device=DEV),
                             torch.empty(1, dtype=torch.int32, device=DEV), 0)
        assert_same(dst, before)
    case("E empty masks and sources", run_empty)

    # F. CPU-mask staging: back-to-back calls with different masks, then a map larger than a quarter
    def run_staging():
        n, h, k = 3000, 8, 1000
        src = torch.randint(-8, 8, (k, h), device=DEV).float()
        dst = torch.zeros(n, h, device=DEV)
        expected = dst.clone()
        for i in range(60):
            mask = random_mask((n,), k, seed=100 + i)
            mt.masked_row_scatter_(dst, mask, src, accumulate=True, path="triton")
            expected = reference(expected, mask, src, True)
        assert_same(dst, expected)
    case("F staging: 60 calls", run_staging)

    def run_staging_grow():
        from mmmerge_triton import staging
        q_rows = staging.arena(DEV.index).quarter_bytes // 4
        n, k = q_rows + 5000, q_rows + 16
        mask = random_mask((n,), k, seed=12)
        src = rand((k, 1), torch.float32, seed=13)
        dst = rand((n, 1), torch.float16, seed=14)
        expected = reference(dst, mask, src)
        mt.masked_row_scatter_(dst, mask, src, path="triton")
        assert_same(dst, expected)
    case("F staging: a row map larger than a quarter", run_staging_grow)

    # G. plans (GPU and CPU masks), update_, accumulate
    for kind in ("plan", "plan_cpu"):
        for acc in (False, True):
            def run(kind=kind, acc=acc):
                for seed in (15, 16):
                    mask = random_mask((300,), 120, seed=seed)
                    dst = rand((300, 70), torch.float16, seed=seed)
                    src = rand((120, 70), torch.float32, seed=seed + 1)
                    expected = reference(dst, mask, src, acc)
                    merge(kind, dst, mask, src, acc)
                    assert_same(dst, expected)
            case(f"G {kind} {'add' if acc else 'copy'}", run)

    def run_plan_update():
        mask = random_mask((300,), 120, seed=17)
        plan = mt.MergePlan(mask.to(DEV))
        for seed in (18, 19):
            mask = random_mask((300,), 120, seed=seed)
            plan.update_(mask.to(DEV))
            dst = rand((300, 70), torch.bfloat16, seed=seed)
            src = rand((120, 70), torch.bfloat16, seed=seed + 1)
            expected = reference(dst, mask, src)
            mt.masked_row_scatter_(dst, src=src, plan=plan)
            assert_same(dst, expected)
    case("G plan update_", run_plan_update)

    # H. the backward (GATHER and the scatter of zeros through autograd), CPU and GPU masks
    for mask_kind in ("cpu", "gpu"):
        for acc in (False, True):
            def run(mask_kind=mask_kind, acc=acc):
                mask = random_mask((200,), 80, seed=20)
                if mask_kind == "gpu":
                    mask = mask.to(DEV)
                dst = rand((200, 45), torch.bfloat16, seed=21)
                src = rand((80, 45), torch.float32, seed=22)
                grad = rand((200, 45), torch.bfloat16, seed=23)
                d, s = dst.clone().requires_grad_(), src.clone().requires_grad_()
                mt.masked_row_scatter(d, mask, s, accumulate=acc).backward(grad)
                d2, s2 = dst.clone().requires_grad_(), src.clone().requires_grad_()
                d2.index_put((mask.to(DEV),), s2.to(torch.bfloat16), accumulate=acc).backward(grad)
                assert_same(d.grad, d2.grad, "dst.grad")
                assert_same(s.grad, s2.grad, "src.grad")
            case(f"H backward {mask_kind} {'add' if acc else 'copy'}", run)

    # I. misaligned and strided views, 3-D
    def views():
        n, h, m = 40, 50, 15
        yield "dst misaligned", (lambda t: t.view(-1)[1:1 + n * h].view(n, h)), (n * h + 4,), None, (m, h)
        yield "dst row stride", (lambda t: t[:, :h]), (n, h + 3), None, (m, h)
        yield "src misaligned", None, (n, h), (lambda t: t.view(-1)[3:3 + m * h].view(m, h)), (m * h + 4,)
        yield "src row stride", None, (n, h), (lambda t: t[:, :h]), (m, h + 5)
        yield "src column stride", None, (n, h), (lambda t: t.t()), (h, m)
        yield "3-D", (lambda t: t.view(4, 10, h)), (n, h), None, (m, h)

    for name, dview, dshape, sview, sshape in views():
        for kind in ("cpu", "fused", "two_pass"):
            def run(dview=dview, dshape=dshape, sview=sview, sshape=sshape, kind=kind):
                storage = rand(dshape, torch.float16, seed=24)
                dv = dview or (lambda t: t)
                dst = dv(storage)
                src = (sview or (lambda t: t))(rand(sshape, torch.float32, seed=25))
                mask = random_mask(dst.shape[:-1], src.shape[0], seed=26)
                ref_storage = storage.clone()
                dv(ref_storage).index_put_((mask.to(DEV),), src.to(torch.float16))
                if kind == "cpu":
                    mt.masked_row_scatter_(dst, mask, src, path="triton")
                else:
                    executor.merge_triton(dst, mask.to(DEV), src, False,
                                          config=CFG_FUSED if kind == "fused" else CFG)
                assert_same(storage, ref_storage)
            case(f"I {name} {kind}", run)

    # J. the torch paths on small shapes (memcheck covers torch's kernels too)
    for path in ("index_put", "index_copy", "masked_scatter"):
        for mask_kind in ("cpu", "gpu"):
            for acc in (False, True):
                def run(path=path, mask_kind=mask_kind, acc=acc):
                    mask = random_mask((90,), 30, seed=27)
                    m = mask.to(DEV) if mask_kind == "gpu" else mask
                    dst = rand((90, 20), torch.bfloat16, seed=28)
                    src = rand((30, 20), torch.float32, seed=29)
                    expected = reference(dst, mask, src, acc)
                    mt.masked_row_scatter_(dst, m, src, accumulate=acc, path=path)
                    assert_same(dst, expected)
                case(f"J {path} {mask_kind} {'add' if acc else 'copy'}", run)

    # L. lists of items through the multi-item kernel: device masks with K != M both ways (no host check),
    # CPU masks, plans, ADD (direct), empty items, misaligned and reversed items, many items
    from mmmerge_triton import items as mm_items

    def item_list(layout, h):
        if layout == "separate":
            return [rand((30, h), torch.float32, seed=40), rand((1, h), torch.float32, seed=41),
                    rand((17, h), torch.float32, seed=42)]
        if layout == "reversed":
            big = rand((60, h), torch.float32, seed=43)
            return [big[40:], big[:15], big[15:40]]
        if layout == "misaligned":
            return [rand((21 * h + 8,), torch.float32, seed=44)[1:1 + 21 * h].view(21, h),
                    rand((9 * h + 8,), torch.float32, seed=45)[3:3 + 9 * h].view(9, h)]
        if layout == "empty":
            return [rand((0, h), torch.float32, seed=46), rand((12, h), torch.float32, seed=47),
                    rand((0, h), torch.float32, seed=48)]
        if layout == "many":
            return [rand((1 + i % 4, h), torch.float32, seed=50 + i) for i in range(19)]
        raise AssertionError(layout)

    for layout in ("separate", "reversed", "misaligned", "empty", "many"):
        for h in (1, 33):
            for kind, delta in (("cpu", 0), ("gpu", 0), ("gpu", -5), ("gpu", 5), ("plan", -5), ("plan", 5)):
                def run(layout=layout, h=h, kind=kind, delta=delta):
                    items = item_list(layout, h)
                    flat = torch.cat(items)
                    m = flat.shape[0]
                    k = max(m + delta, 0)
                    n = 2 * m + 3
                    mask = random_mask((n,), k, seed=m + k)
                    dst = rand((n, h), torch.bfloat16, seed=49)
                    expected = expected_mismatch(dst, mask, flat, False)
                    if kind == "cpu":
                        mt.merge_multimodal_embeddings(dst, items, mask, path="triton")
                    elif kind == "plan":
                        mt.merge_multimodal_embeddings(dst, items, plan=mt.MergePlan(mask.to(DEV)), path="triton")
                    else:
                        mt.merge_multimodal_embeddings(dst, items, mask.to(DEV), path="triton")
                    assert_same(dst, expected)
                case(f"L items {layout} H{h} {kind} K-M={delta}", run)
        for mask_kind in ("cpu", "gpu"):
            def run(layout=layout, mask_kind=mask_kind):
                items = [t for t in item_list(layout, 33)]
                flat = torch.cat(items)
                m = flat.shape[0]
                mask = random_mask((2 * m + 1,), m, seed=m)
                dst = rand((2 * m + 1, 33), torch.float16, seed=51)
                expected = reference(dst, mask, flat, True)
                stride = mm_items.common_row_stride([t for t in items if t.shape[0]])
                on = mask if mask_kind == "cpu" else mask.to(DEV)  # a device mask's map: the caller's (executor.run)
                rowmap = None if mask_kind == "cpu" else device_rows(on, m)
                mm_items.merge_items(dst, on, mm_items.ItemList.of(items), stride, True, CFG, rowmap)
                assert_same(dst, expected)
            case(f"L items {layout} accumulate {mask_kind}", run)

    # M. bool masks whose true bytes are not 1 (uint8_tensor.view(torch.bool)): any nonzero byte is True, on
    # every kernel and every path; a byte summed as its value would misplace rows or leave row-map entries
    # unwritten that row_copy then dereferences.
    for n, k in [(64, 30), (5000, 2500), (17000, 9000)]:
        for kind in ("cpu", "fused", "two_pass", "plan", "plan_cpu", "api"):
            for acc in (False, True):
                def run(n=n, k=k, kind=kind, acc=acc):
                    clean = random_mask((n,), k, seed=n + 7)
                    g = torch.Generator().manual_seed(n)
                    odd = (clean.to(torch.uint8) * torch.randint(1, 256, (n,), generator=g, dtype=torch.uint8))
                    odd = torch.where(clean, odd.clamp(min=2), odd).view(torch.bool)
                    dst = rand((n, 48), torch.bfloat16, seed=41)
                    src = rand((k, 48), torch.float32, seed=42)
                    expected = reference(dst, clean, src, acc)
                    merge(kind, dst, odd, src, acc)
                    assert_same(dst, expected)
                case(f"M odd mask bytes N{n} {kind} {'add' if acc else 'copy'}", run)
    for path in ("auto", "triton", "index_put", "masked_scatter", "index_copy"):
        for on_device in (False, True):
            def run(path=path, on_device=on_device):
                n, k = 300, 120
                clean = random_mask((n,), k, seed=5)
                odd = (clean.to(torch.uint8) * 255).view(torch.bool)
                odd = odd.to(DEV) if on_device else odd
                dst = rand((n, 24), torch.float16, seed=43)
                src = rand((k, 24), torch.float16, seed=44)
                expected = reference(dst, clean, src)
                mt.masked_row_scatter_(dst, odd, src, path=path)
                assert_same(dst, expected)
            case(f"M odd mask bytes path={path} {'device' if on_device else 'cpu'} mask", run)

    # N. a device mask that is dst's own bytes (the one-launch kernel would read bytes it writes): read first
    for kind in ("auto", "triton"):
        def run(kind=kind):
            n, h = 4096, 64
            dst = torch.zeros(n, h, dtype=torch.float16, device=DEV)
            selected = random_mask((n,), 1000, seed=9)
            selected[0] = True
            mask = dst.view(torch.uint8).reshape(-1)[:n].view(torch.bool)
            mask.view(torch.uint8).copy_(selected.view(torch.uint8).to(DEV))
            src = rand((int(selected.sum()), h), torch.float16, seed=45)
            expected = reference(dst, selected, src)
            mt.masked_row_scatter_(dst, mask, src, path=kind)
            assert_same(dst, expected)
        case(f"N device mask aliasing dst path={kind}", run)

    # O. merge_requests with items at addresses that are not a multiple of their element size (a storage sliced
    # at an odd byte): merged from aligned copies, never read as their dtype (a misaligned-address fault); and
    # a lone item that is rows of dst the merge writes first (read before any write)
    def odd_address(values, offset):
        size = values.element_size()
        base = torch.zeros(values.numel() * size + 16, dtype=torch.uint8, device=DEV)
        t = torch.empty(0, dtype=values.dtype, device=DEV).set_(
            base.untyped_storage()[offset:], 0, tuple(values.shape), (values.shape[1], 1))
        t.unsqueeze(-1).view(torch.uint8).copy_(values.unsqueeze(-1).view(torch.uint8))
        t.keep_alive = base
        return t

    for dtype, offset in ((torch.float16, 1), (torch.float32, 2)):
        for path in ("triton", "auto", "index_put"):
            for mask_device in ("cpu", "gpu"):
                def run(dtype=dtype, offset=offset, path=path, mask_device=mask_device):
                    h = 33
                    offsets = [0, 40, 110, 119]
                    mask = random_mask((119,), 0, seed=60)
                    for a, b in zip(offsets[:-1], offsets[1:]):
                        mask[a:b] = random_mask((b - a,), (b - a) // 2, seed=a)
                    c = [int(mask[a:b].sum()) for a, b in zip(offsets[:-1], offsets[1:])]
                    values = [rand((c[0], h), dtype, seed=61), rand((c[1], h), dtype, seed=62),
                              rand((c[2] + 1, h), dtype, seed=63)]  # the last request one row too many
                    dst = rand((119, h), torch.bfloat16, seed=64)
                    expected = dst.clone()
                    for r in (0, 1):
                        a, b = offsets[r], offsets[r + 1]
                        expected[a:b] = reference(expected[a:b], mask[a:b], values[r])
                    per_request = [odd_address(values[0], offset), [values[1][:3], odd_address(values[1][3:], offset)],
                                   odd_address(values[2], offset)]
                    status = mt.merge_requests(dst, per_request, mask.to(DEV) if mask_device == "gpu" else mask,
                                               offsets, path=path)
                    assert status.cpu().tolist() == [True, True, False]
                    assert_same(dst, expected)
                case(f"O merge_requests odd-address items {dtype} +{offset}B path={path} {mask_device} mask", run)
    for path in ("triton", "index_put"):
        for mask_device in ("cpu", "gpu"):
            def run(path=path, mask_device=mask_device):
                mask = torch.zeros(64, dtype=torch.bool)
                mask[2:6] = True
                dst = rand((64, 40), torch.float16, seed=65)
                expected = reference(dst, mask, dst[0:4].clone())
                status = mt.merge_requests(dst, [dst[0:4], []], mask.to(DEV) if mask_device == "gpu" else mask,
                                           [0, 8, 64], path=path)
                assert status.cpu().tolist() == [True, True]
                assert_same(dst, expected)
            case(f"O merge_requests lone item of dst's rows path={path} {mask_device} mask", run)

    # K (last): device masks whose flattened view is strided or expanded (a suspected package bug: the
    # kernels read mask.reshape(-1).view(torch.uint8) as contiguous bytes).
    for mask_layout in ("strided", "expanded"):
        for kind in ("fused", "two_pass", "plan"):
            def run(mask_layout=mask_layout, kind=kind):
                n, h = 300, 16
                if mask_layout == "strided":
                    host = random_mask((n,), 100, seed=30)
                    big = torch.zeros(2 * n, dtype=torch.bool, device=DEV)
                    big[::2] = host.to(DEV)
                    mask = big[::2]
                else:
                    host = torch.ones(n, dtype=torch.bool)
                    mask = torch.ones(1, dtype=torch.bool, device=DEV).expand(n)
                m = int(host.sum())
                dst = rand((n, h), torch.float32, seed=31)
                src = rand((m, h), torch.float32, seed=32)
                expected = reference(dst, host, src)
                if kind == "plan":
                    mt.masked_row_scatter_(dst, src=src, plan=mt.MergePlan(mask))
                else:
                    executor.merge_triton(dst, mask, src, False, config=CFG_FUSED if kind == "fused" else CFG)
                assert_same(dst, expected)
            case(f"K {mask_layout} device mask {kind}", run)

    # P. row positions: device positions out of range both ways (skipped by the bounded row copy, never read or
    # written), int32 and int64, huge values; CPU positions staged; several modalities with overlapping device
    # masks and a device mask whose count differs from its src (the -1 entries of the concatenated map)
    for dtype in (torch.int32, torch.int64):
        for where in ("gpu", "cpu"):
            def run(dtype=dtype, where=where):
                n, h = 257, 33
                dst = rand((n, h), torch.bfloat16, seed=61)
                wild = [0, n - 1, 7, 100] + ([-1, n, -(2**31), 2**31 - 1] if where == "gpu" else [])
                positions = torch.tensor(wild, dtype=dtype)
                src = rand((len(wild), h), torch.float32, seed=62)
                inside = (positions >= 0) & (positions < n)
                expected = dst.clone()
                expected.index_copy_(0, positions[inside].long().to(DEV), src[inside].to(dst.dtype))
                mt.indexed_row_scatter_(dst, positions.to(DEV) if where == "gpu" else positions, src)
                assert_same(dst, expected)
            case(f"P positions {dtype} {where}", run)
    for layout in ("disjoint", "overlap", "short"):
        def run(layout=layout):
            n, h = 301, 40
            host = [random_mask((n,), 60, seed=63 + k) for k in range(3)]
            if layout == "disjoint":
                host[1] &= ~host[0]
                host[2] &= ~(host[0] | host[1])
            srcs = [rand((int(mk.sum()) + (5 if layout == "short" and k == 1 else 0), h), torch.float16, seed=70 + k)
                    for k, mk in enumerate(host)]
            dst = rand((n, h), torch.float16, seed=69)
            expected = dst.clone()
            for mk, src in zip(host, srcs):
                k_rows = int(mk.sum())
                expected[mk.to(DEV)] = src[:k_rows]
            mt.merge_modalities_(dst, [(mk.to(DEV), src) for mk, src in zip(host, srcs)])
            assert_same(dst, expected)
        case(f"P modalities {layout} device masks", run)

    summary = f"sanitize: {RAN} cases run"
    if FAILURES:
        summary += f", {len(FAILURES)} failed: " + "; ".join(FAILURES[:20]) + (" ..." if len(FAILURES) > 20 else "")
    print(summary)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
