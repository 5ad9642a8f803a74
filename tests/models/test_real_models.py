"""Inside a real model: the merge of a transformers VLM done by ``mmmerge_triton.masked_row_scatter``.

For tiny random Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA models (tiny_vlms.py), the stock forward is compared
with the same forward whose image merge is done by mmmerge_triton: the model's own embedding layer,
``get_image_features`` and ``get_placeholder_mask`` give the embeddings, features and mask; mmmerge_triton merges
them; the rest of the forward runs from ``inputs_embeds`` (see ``merged_forward``). Logits, the gradient of the
image features and the gradients of every parameter must be bit-identical: the merge is a copy of rows, in
both directions, so nothing downstream or upstream of it can differ.
"""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("transformers")

import mmmerge_triton  # noqa: E402
import tiny_vlms  # noqa: E402  (tests/models is on sys.path: pytest's rootdir-relative "prepend" import)
from mmmerge_triton.launch import INTERPRET  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
INTERPRETER = pytest.mark.skipif(not INTERPRET, reason="the Triton path on CPU tensors needs TRITON_INTERPRET=1")

# (device, path, mask device): the CPU runs PyTorch's index_put, and the Triton kernels under the interpreter
# (which tests/conftest.py switches on where CUDA is unavailable); CUDA runs the compiled Triton kernels, with
# the mask on the GPU (as HF builds it) or on the CPU (as vLLM passes it).
DEVICE_PATHS = [
    pytest.param("cpu", "index_put", "cpu", id="cpu-index_put"),
    pytest.param("cpu", "triton", "cpu", id="cpu-triton", marks=INTERPRETER),
    pytest.param("cuda", "triton", "cuda", id="cuda-triton", marks=CUDA),
    pytest.param("cuda", "triton", "cpu", id="cuda-triton-cpu_mask", marks=CUDA),
]
MODELS = [
    pytest.param(name, marks=pytest.mark.skipif(not tiny_vlms.available(name), reason=f"transformers lacks {name}"))
    for name in tiny_vlms.MODELS
]


def merged_forward(model, inputs, path: str, mask_device, kept: dict | None = None) -> torch.Tensor:
    """The stock forward with its image merge done by ``mmmerge_triton.masked_row_scatter``; returns the logits.
    The merged image features (gradient retained) go to ``kept["features"]``.

    What the forward needs besides ``inputs_embeds``, read from the 5.24 model code:
    - LLaVA: nothing (the positions default to arange, as in the stock forward).
    - Qwen2-VL / 2.5-VL: the 3-D M-RoPE ``position_ids``; the stock forward derives them from input_ids,
      image_grid_thw and mm_token_type_ids, which a forward from inputs_embeds alone cannot (it would fall
      back to ``rope_deltas`` left by an earlier call, or to 1-D positions). They are computed here by the
      model's own functions (tiny_vlms.qwen_position_ids) and passed in.
    - Qwen3-VL: the positions, and the deepstack inputs (``visual_pos_masks``, ``deepstack_visual_embeds``),
      which ``Qwen3VLModel.forward`` builds only when it computes the image features itself. So the text model
      is called with them, then ``lm_head``, as ``Qwen3VLForConditionalGeneration.forward`` does. The
      deepstack add itself stays HF's (test_transformers_integration.py covers its replacement).
    """
    inner = model.model
    input_ids = inputs["input_ids"]
    inputs_embeds = inner.get_input_embeddings()(input_ids)
    qwen = "image_grid_thw" in inputs
    features, deepstack = tiny_vlms.image_features(model, inputs)
    features = features.to(inputs_embeds.device, inputs_embeds.dtype)
    mask = inner.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)
    mask = mask[0] if isinstance(mask, tuple) else mask  # Qwen returns (image mask, video mask); [B, S, 1]

    if kept is not None and features.requires_grad:
        features.retain_grad()
        kept["features"] = features
    merged = mmmerge_triton.masked_row_scatter(inputs_embeds, mask[..., 0].to(mask_device), features, path=path)

    rest = dict(attention_mask=inputs["attention_mask"])
    if qwen:
        rest["position_ids"] = tiny_vlms.qwen_position_ids(model, inputs, merged)
    if deepstack is not None:  # Qwen3-VL
        hidden = inner.language_model(inputs_embeds=merged, visual_pos_masks=mask[..., 0],
                                      deepstack_visual_embeds=deepstack, **rest).last_hidden_state
        return model.lm_head(hidden)
    return model(inputs_embeds=merged, **rest).logits


@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("device, path, mask_device", DEVICE_PATHS)
def test_merge_inside_model_matches_stock(name, n_images, device, path, mask_device):
    """mmmerge_triton's merge inside a real VLM forward gives the stock logits, image-feature gradients and
    parameter gradients (vision tower, projector and text model) bit for bit. The gradient of the features
    tensor handed to masked_row_scatter is the stock gradient of the vision output, in row order."""
    model, inputs = tiny_vlms.build(name, n_images, device=device)
    stock = tiny_vlms.forward_backward(model, lambda: model(**inputs).logits)
    kept = {}
    merged = tiny_vlms.forward_backward(model, lambda: merged_forward(model, inputs, path, mask_device, kept))
    assert stock.logits.isfinite().all()
    tiny_vlms.assert_runs_equal(merged, stock)
    features = kept["features"]
    assert torch.equal(features.grad, stock.feature_grad.reshape(features.shape))


@pytest.mark.parametrize("device, path, mask_device", DEVICE_PATHS)
def test_placeholder_mask_from_embeddings(device, path, mask_device):
    """The merge also works with the mask HF builds when only ``inputs_embeds`` is known (``input_ids=None``:
    the rows equal to the image token's embedding), and gives the stock logits (LLaVA, 2 images)."""
    model, inputs = tiny_vlms.build("llava", 2, device=device)
    inner = model.model
    with torch.no_grad():
        expected = model(**inputs).logits
        inputs_embeds = inner.get_input_embeddings()(inputs["input_ids"])
        features, _ = tiny_vlms.image_features(model, inputs)
        mask = inner.get_placeholder_mask(None, inputs_embeds=inputs_embeds, image_features=features)
        assert torch.equal(mask[..., 0], inputs["input_ids"] == tiny_vlms.IMG)
        merged = mmmerge_triton.masked_row_scatter(inputs_embeds, mask[..., 0].to(mask_device), features, path=path)
        logits = model(inputs_embeds=merged, attention_mask=inputs["attention_mask"]).logits
    assert torch.equal(logits, expected)
