"""Tiny random-weight HF models that merge several modalities into one sequence, built on the CPU with no
download, and their inputs: Qwen2.5-Omni and Qwen3-Omni thinkers (audio, image, video) and Qwen2-VL (image and
video). The configs of notes/omni.md section 3 (transformers 5.25). ``build(name)`` returns ``(model, inputs)``:
the model in eval mode, fp32, seeded, the inputs a dict for ``model(**inputs)``.

``forward_backward`` runs a forward and the backward of a fixed random projection of its logits, keeping what
``tiny_vlms.assert_runs_equal`` compares (logits, the gradient of every encoder's output, every parameter's
gradient).

Import this module only after ``pytest.importorskip("transformers")``.
"""
from __future__ import annotations

from typing import Callable

import torch
import transformers

import tiny_vlms

AUDIO, IMAGE, VIDEO = 100, 101, 102  # the omni models' placeholder token ids (< tiny_vlms.VOCAB)
AUDIO_START, AUDIO_END, VISION_START, VISION_END = 103, 104, 105, 106

_TEXT = dict(vocab_size=tiny_vlms.VOCAB, hidden_size=tiny_vlms.HID, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
_OMNI_TOKENS = dict(audio_start_token_id=AUDIO_START, audio_end_token_id=AUDIO_END,
                    vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
_GRIDS = dict(image_grid_thw=torch.tensor([[1, 4, 4]]), video_grid_thw=torch.tensor([[2, 4, 4]]))  # 4 and 8 tokens


def _qwen2_5_omni():
    cfg = transformers.Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          d_model=16, output_dim=tiny_vlms.HID, n_window=4, max_source_positions=100),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=tiny_vlms.HID,
                           fullatt_block_indexes=[0], window_size=56, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        text_config=dict(**_TEXT, **tiny_vlms._rope(mrope_section=[2, 3, 3])),
        audio_token_index=AUDIO, image_token_index=IMAGE, video_token_index=VIDEO, **_OMNI_TOKENS)
    return transformers.Qwen2_5OmniThinkerForConditionalGeneration(cfg)


def _qwen3_omni():
    cfg = transformers.Qwen3OmniMoeThinkerConfig(
        # n_window=50 (with n_window_infer, conv_chunksize): a smaller window fails inside the audio encoder
        audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          d_model=16, output_dim=tiny_vlms.HID, n_window=50, n_window_infer=800, conv_chunksize=500,
                          max_source_positions=100, downsample_hidden_size=8),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=tiny_vlms.HID,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 1]),
        text_config=dict(**_TEXT, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                         **tiny_vlms._rope(mrope_section=[4, 2, 2], mrope_interleaved=True)),
        audio_token_id=AUDIO, image_token_id=IMAGE, video_token_id=VIDEO, **_OMNI_TOKENS)
    return transformers.Qwen3OmniMoeThinkerForConditionalGeneration(cfg)


def _pixels(model, grid: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    vision = model.config.vision_config
    channels = 3 * vision.temporal_patch_size * vision.patch_size**2
    return torch.randn(int(grid.prod(-1).sum()), channels, generator=generator)


def _omni_inputs(model, audio_frames: int, audio_tokens: int, generator: torch.Generator) -> dict:
    """Audio, then an image, then a video, each between its start and end tokens."""
    ids = ([1, 2, AUDIO_START] + [AUDIO] * audio_tokens + [AUDIO_END, VISION_START] + [IMAGE] * 4
           + [VISION_END, VISION_START] + [VIDEO] * 8 + [VISION_END, 3])
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                input_features=torch.randn(1, 16, audio_frames, generator=generator),
                feature_attention_mask=torch.ones(1, audio_frames, dtype=torch.long),
                pixel_values=_pixels(model, _GRIDS["image_grid_thw"], generator),
                pixel_values_videos=_pixels(model, _GRIDS["video_grid_thw"], generator),
                video_second_per_grid=torch.tensor([1.0]), **_GRIDS)


def _qwen2_5_omni_inputs(model, generator):
    return _omni_inputs(model, audio_frames=32, audio_tokens=8, generator=generator)


def _qwen2_5_omni_audio_in_video_inputs(model, generator):
    """``use_audio_in_video=True``: the video's audio track, its tokens interleaved with the video's in chunks
    (as the processor lays them out); two merges, audio then video, on interleaved masks."""
    ids = ([1, VISION_START, AUDIO_START] + [VIDEO] * 4 + [AUDIO] * 4 + [VIDEO] * 4 + [AUDIO] * 4
           + [AUDIO_END, VISION_END, 2])
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                input_features=torch.randn(1, 16, 32, generator=generator),
                feature_attention_mask=torch.ones(1, 32, dtype=torch.long),
                pixel_values_videos=_pixels(model, _GRIDS["video_grid_thw"], generator),
                video_grid_thw=_GRIDS["video_grid_thw"], video_second_per_grid=torch.tensor([1.0]),
                use_audio_in_video=True)


def _qwen3_omni_inputs(model, generator):
    return _omni_inputs(model, audio_frames=100, audio_tokens=13, generator=generator)


def _qwen2vl_inputs(model, generator):
    """An image, then a video."""
    img, vid, vs, ve = tiny_vlms.IMG, tiny_vlms.VID, tiny_vlms.VS, tiny_vlms.VE
    input_ids = torch.tensor([[1, 1, vs] + [img] * 4 + [ve, vs] + [vid] * 8 + [ve, 2]])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                mm_token_type_ids=(input_ids == img).int() + 2 * (input_ids == vid).int(),
                pixel_values=_pixels(model, _GRIDS["image_grid_thw"], generator),
                pixel_values_videos=_pixels(model, _GRIDS["video_grid_thw"], generator), **_GRIDS)


# name -> (transformers class it needs, builder, inputs builder, merges per forward)
_MODELS = {
    "qwen2_5_omni": ("Qwen2_5OmniThinkerForConditionalGeneration", _qwen2_5_omni, _qwen2_5_omni_inputs, 3),
    "qwen2_5_omni_audio_in_video": ("Qwen2_5OmniThinkerForConditionalGeneration", _qwen2_5_omni,
                                    _qwen2_5_omni_audio_in_video_inputs, 2),
    "qwen3_omni": ("Qwen3OmniMoeThinkerForConditionalGeneration", _qwen3_omni, _qwen3_omni_inputs, 3),
    "qwen2vl": ("Qwen2VLForConditionalGeneration", tiny_vlms._qwen2vl, _qwen2vl_inputs, 2),
}
MODELS = tuple(_MODELS)


def available(name: str) -> bool:
    """Whether the installed transformers builds and runs ``name``'s tiny model (the Qwen3-Omni config is written
    for transformers 5: 4.57's vision merger takes other sizes and its own forward fails on these inputs)."""
    if name == "qwen3_omni" and int(transformers.__version__.split(".")[0]) < 5:
        return False
    return hasattr(transformers, _MODELS[name][0])


def merges(name: str) -> int:
    """How many ``masked_scatter`` merges one forward of ``build(name)``'s inputs makes."""
    return _MODELS[name][3]


def build(name: str, seed: int = 0):
    """``(model, inputs)``: the tiny model ``name`` on the CPU (random fp32 weights from ``seed``, eval mode) and
    its inputs for ``model(**inputs)``."""
    _, make_model, make_inputs, _ = _MODELS[name]
    torch.manual_seed(seed)
    model = make_model().eval()
    return model, make_inputs(model, torch.Generator().manual_seed(seed + 1))


ENCODERS = ("visual", "audio_tower")  # attributes of the merging module whose output the merges consume


def merging_module(model):
    """The module whose forward merges and holds the encoders: the inner model (``model.model``, which has a
    ``language_model``: transformers 5.25, and Qwen2-VL in every 5.x), or the model itself (the omni thinkers
    of transformers 5.17, whose ``model`` is the text model)."""
    return model.model if hasattr(model.model, "language_model") else model


def text_model(model):
    """The text model the merged ``inputs_embeds`` go to."""
    merging = merging_module(model)
    return merging.language_model if merging is not model else model.model


def forward_backward(model, forward: Callable[[], torch.Tensor], seed: int = 1234) -> tiny_vlms.Run:
    """``logits = forward()``, then the backward of ``(logits * P).sum()`` for a fixed random P. The feature
    gradient kept is that of every encoder output, in the order they ran, flattened and concatenated."""
    model.zero_grad(set_to_none=True)
    seen = []

    def hook(module, args, output):
        features = output[0] if isinstance(output, tuple) else output
        if not isinstance(features, torch.Tensor):
            pooled = getattr(features, "pooler_output", None)
            features = pooled if pooled is not None else features.last_hidden_state
        if features.requires_grad:
            features.retain_grad()
            seen.append(features)

    merging = merging_module(model)
    handles = [getattr(merging, name).register_forward_hook(hook) for name in ENCODERS if hasattr(merging, name)]
    try:
        logits = forward()
    finally:
        for handle in handles:
            handle.remove()
    projection = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed)).to(logits.device)
    (logits * projection).sum().backward()
    assert seen, "no encoder output took part in the backward"
    feature_grad = torch.cat([features.grad.reshape(-1) for features in seen])
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    return tiny_vlms.Run(logits.detach(), feature_grad, grads)
