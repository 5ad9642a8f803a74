"""sgl_kernel.quantization, as stubbed in __init__.py: the names layers/quantization/gguf.py imports."""
from sgl_kernel import _unavailable

ggml_dequantize = _unavailable("quantization.ggml_dequantize")
ggml_moe_a8 = _unavailable("quantization.ggml_moe_a8")
ggml_mul_mat_a8 = _unavailable("quantization.ggml_mul_mat_a8")
ggml_mul_mat_vec_a8 = _unavailable("quantization.ggml_mul_mat_vec_a8")
