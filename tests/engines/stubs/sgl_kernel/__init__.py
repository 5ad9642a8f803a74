"""An import-time stand-in for sgl_kernel (SGLang's compiled CUDA kernels), for tests/engines only.

tests/engines/conftest.py puts its folder at the end of sys.path only where no sgl_kernel is installed (the
bundle for the GPU machine carries none: the wheel is built for another torch). With CUDA visible, SGLang
0.5.23 imports the names below at module level, unguarded, on the import path of
sglang.srt.managers.mm_utils, schedule_batch and models.qwen3_vl (found by importing those with
torch.cuda.is_available() patched to True and adding each name an ImportError asked for). Nothing the merge
tests run calls them: each raises if called. Nothing else is here, so SGLang's guarded imports
(``try: from sgl_kernel.scalar_type import ...``, ``import sgl_kernel.allreduce``, any other name) still fail
with ImportError and take their fallbacks, as without sgl_kernel.
"""


def _unavailable(name):
    def kernel(*args, **kwargs):
        raise RuntimeError(f"sgl_kernel.{name} is an import-time stub (tests/engines/stubs): no kernel here")

    kernel.__name__ = kernel.__qualname__ = name.rsplit(".", 1)[-1]
    return kernel


# layers/quantization/compressed_tensors/schemes/compressed_tensors_w8a8_int8.py
int8_scaled_mm = _unavailable("int8_scaled_mm")
# layers/moe/moe_runner/triton_utils/fused_moe.py, layers/quantization/gguf.py
moe_sum_reduce = _unavailable("moe_sum_reduce")
moe_sum = _unavailable("moe_sum")
# layers/layernorm.py
fused_add_rmsnorm = _unavailable("fused_add_rmsnorm")
gemma_fused_add_rmsnorm = _unavailable("gemma_fused_add_rmsnorm")
gemma_rmsnorm = _unavailable("gemma_rmsnorm")
rmsnorm = _unavailable("rmsnorm")
# layers/activation.py
gelu_and_mul = _unavailable("gelu_and_mul")
gelu_tanh_and_mul = _unavailable("gelu_tanh_and_mul")
silu_and_mul = _unavailable("silu_and_mul")
