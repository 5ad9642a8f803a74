"""Tiny random-weight VLMs of HF transformers, built on the CPU with no download, and their inputs.

The recipe of notes/integrations.md section 4.6 (tested on transformers 5.24): Qwen2-VL, Qwen2.5-VL, Qwen3-VL
and LLaVA with a 64-wide, 2-layer text model and a 2-layer vision tower, fp32, seeded. ``build(name, n_images)``
returns ``(model, inputs)``: the model in eval mode, the inputs a dict for ``model(**inputs)``.

``forward_backward`` runs a forward and the backward of a fixed random projection of its logits, keeping what
the tests compare (logits, the gradient of the image features, every parameter's gradient).

Import this module only after ``pytest.importorskip("transformers")``.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, NamedTuple

import torch
import transformers

IMG, VID, VS, VE = 90, 91, 92, 93  # image / video / vision_start / vision_end token ids (< VOCAB)
VOCAB, HID = 128, 64

# Qwen image grids (t, h, w) in patches; h and w multiples of spatial_merge_size (2). 4 and 3 image tokens.
QWEN_GRIDS = ((1, 4, 4), (1, 2, 6))

_TEXT = dict(vocab_size=VOCAB, hidden_size=HID, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
_SPECIAL = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
_V5 = int(transformers.__version__.split(".")[0]) >= 5


def _rope(**mrope) -> dict:
    """The text config's multimodal rotary settings: transformers 5 reads ``rope_parameters``, 4.x
    ``rope_theta`` and ``rope_scaling``."""
    if _V5:
        return dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, **mrope))
    return dict(rope_theta=10000.0, rope_scaling=dict(rope_type="default", **mrope))


def _qwen2vl():
    cfg = transformers.Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=HID, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text_config=dict(**_TEXT, **_rope(mrope_section=[2, 3, 3])),  # sums to head_dim / 2
        **_SPECIAL)
    return transformers.Qwen2VLForConditionalGeneration(cfg)


def _qwen2_5_vl():
    cfg = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=HID,
                           window_size=56, fullatt_block_indexes=[1]),  # 56 px = 2x2 merged windows
        text_config=dict(**_TEXT, **_rope(mrope_section=[2, 3, 3])),
        **_SPECIAL)
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg)


def _qwen3vl():
    cfg = transformers.Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=HID,
                           num_position_embeddings=16,       # a perfect square (4x4 learned position grid)
                           deepstack_visual_indexes=[0, 1]),  # two deepstack levels, added after text layers 0, 1
        text_config=dict(**_TEXT, head_dim=16, **_rope(mrope_section=[4, 2, 2], mrope_interleaved=True)),
        **_SPECIAL)
    return transformers.Qwen3VLForConditionalGeneration(cfg)


def _llava():
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=28, patch_size=14, num_channels=3,
                                           projection_dim=32)
    text = transformers.LlamaConfig(**{k: v for k, v in _TEXT.items() if not k.endswith("token_id")})
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMG,
                                   vision_feature_layer=-1, vision_feature_select_strategy="default",
                                   image_seq_length=4)
    return transformers.LlavaForConditionalGeneration(cfg)


def _qwen_inputs(model, n_images: int, generator: torch.Generator) -> dict:
    vision = model.config.vision_config
    merge = vision.spatial_merge_size
    channels = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    grids = QWEN_GRIDS[:n_images]
    ids = [1, 1, 1]
    for t, h, w in grids:
        ids += [VS] + [IMG] * (t * h * w // merge**2) + [VE]
    ids += [2, 2]
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                mm_token_type_ids=(input_ids == IMG).int() + 2 * (input_ids == VID).int(),
                pixel_values=torch.randn(sum(t * h * w for t, h, w in grids), channels, generator=generator),
                image_grid_thw=torch.tensor(grids, dtype=torch.long))


def _llava_inputs(model, n_images: int, generator: torch.Generator) -> dict:
    vision = model.config.vision_config
    ids = [1, 5]
    for _ in range(n_images):
        ids += [IMG] * (vision.image_size // vision.patch_size) ** 2 + [6]  # 4 image tokens per image
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                pixel_values=torch.randn(n_images, 3, vision.image_size, vision.image_size, generator=generator))


# name -> (transformers class it needs, builder, inputs builder)
_MODELS = {
    "qwen2vl": ("Qwen2VLForConditionalGeneration", _qwen2vl, _qwen_inputs),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", _qwen2_5_vl, _qwen_inputs),
    "qwen3vl": ("Qwen3VLForConditionalGeneration", _qwen3vl, _qwen_inputs),
    "llava": ("LlavaForConditionalGeneration", _llava, _llava_inputs),
}
MODELS = tuple(_MODELS)


def available(name: str) -> bool:
    """Whether the installed transformers has this model (Qwen3-VL needs a recent one)."""
    return hasattr(transformers, _MODELS[name][0])


def is_qwen(name: str) -> bool:
    return name.startswith("qwen")


def build(name: str, n_images: int = 1, seed: int = 0, device: str | torch.device = "cpu"):
    """``(model, inputs)``: the tiny model ``name`` (random fp32 weights from ``seed``, eval mode) on ``device``,
    and inputs with ``n_images`` (1 or 2) images for ``model(**inputs)``."""
    _, make_model, make_inputs = _MODELS[name]
    torch.manual_seed(seed)
    model = make_model().eval()
    inputs = make_inputs(model, n_images, torch.Generator().manual_seed(seed + 1))
    return model.to(device), {k: v.to(device) for k, v in inputs.items()}


def image_features(model, inputs: dict) -> tuple[torch.Tensor, list | None]:
    """The merged image features ``[K, H]`` (all images in order) and Qwen3-VL's deepstack levels (one
    ``[K, H]`` tensor per level; None for other models), as the stock forward computes them. transformers 5
    returns an output object (``pooler_output``, ``deepstack_features``, a tuple per image); 4.x returns the
    per-image features, or ``(features, deepstack levels)`` for Qwen3-VL."""
    inner = model.model
    args = [inputs["pixel_values"]] + ([inputs["image_grid_thw"]] if "image_grid_thw" in inputs else [])
    output = inner.get_image_features(*args, **({"return_dict": True} if _V5 else {}))
    if hasattr(output, "pooler_output"):
        features, deepstack = output.pooler_output, getattr(output, "deepstack_features", None)
    elif isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], (tuple, list)):
        features, deepstack = output
    else:
        features, deepstack = output, None

    def cat(x):
        return x if isinstance(x, torch.Tensor) else torch.cat(list(x), dim=0)

    return cat(features), (None if deepstack is None else [cat(level) for level in deepstack])


def qwen_position_ids(model, inputs: dict, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """Qwen's 3-D M-RoPE positions as the stock forward computes them: ``compute_3d_position_ids`` (recent
    transformers; its keywords differ a little between Qwen versions: those it has are passed) or
    ``get_rope_index`` (4.x)."""
    inner = model.model
    if not hasattr(inner, "compute_3d_position_ids"):
        return inner.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], None, inputs["attention_mask"])[0]
    wanted = dict(input_ids=inputs["input_ids"], inputs_embeds=inputs_embeds, image_grid_thw=inputs["image_grid_thw"],
                  video_grid_thw=None, attention_mask=inputs["attention_mask"],
                  mm_token_type_ids=inputs["mm_token_type_ids"], cache=None, past_key_values=None)
    params = inspect.signature(inner.compute_3d_position_ids).parameters
    return inner.compute_3d_position_ids(**{k: v for k, v in wanted.items() if k in params})


VISION_PREFIXES = ("model.visual.", "model.vision_tower.", "model.multi_modal_projector.",
                   "visual.")  # parameter names ("visual.": an omni thinker of transformers 5.17)


def feature_module(model) -> torch.nn.Module:
    """The module whose output holds the image features that the merge consumes, all images in order: Qwen's
    vision tower (its ``pooler_output``), LLaVA's projector."""
    inner = model.model
    return inner.visual if hasattr(inner, "visual") else inner.multi_modal_projector


class Run(NamedTuple):
    logits: torch.Tensor
    feature_grad: torch.Tensor  # d(loss)/d(the image features the merge consumed)
    param_grads: dict  # parameter name -> gradient (None where none reached it)


@contextlib.contextmanager
def _captured_features(model):
    """Keep the image features that the merge consumes (output of feature_module), with their gradient."""
    seen = []

    def hook(module, args, output):
        if isinstance(output, tuple):  # transformers 4.x Qwen3-VL tower: (features, deepstack features)
            output = output[0]
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        features.retain_grad()
        seen.append(features)

    handle = feature_module(model).register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def forward_backward(model, forward: Callable[[], torch.Tensor], seed: int = 1234) -> Run:
    """``logits = forward()``, then the backward of ``(logits * P).sum()`` for a fixed random P."""
    model.zero_grad(set_to_none=True)
    with _captured_features(model) as seen:
        logits = forward()
    projection = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed)).to(logits.device)
    (logits * projection).sum().backward()
    assert len(seen) == 1, "the vision side ran once"
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    return Run(logits.detach(), seen[0].grad.clone(), grads)


def assert_runs_equal(actual: Run, expected: Run) -> None:
    """Bit-identical logits, image-feature gradients and parameter gradients; some gradient reached the
    vision side (so the comparison covers the backward through the merge)."""
    assert torch.equal(actual.logits, expected.logits), "logits differ"
    assert torch.equal(actual.feature_grad, expected.feature_grad), "image feature gradients differ"
    assert actual.param_grads.keys() == expected.param_grads.keys()
    for name, grad in expected.param_grads.items():
        other = actual.param_grads[name]
        assert (grad is None) == (other is None), f"{name}: a gradient in one run only"
        assert grad is None or torch.equal(other, grad), f"{name}: gradients differ"
    vision = [n for n in expected.param_grads if n.startswith(VISION_PREFIXES)]
    assert vision and any(expected.param_grads[n] is not None for n in vision), "no gradient reached the vision side"
