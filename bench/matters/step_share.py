"""Step share: what the merge is worth inside a real-size transformers VLM step, with and without the switch.

Qwen2-VL at the 7B language-model dimensions (hidden 3584, intermediate 18944, 28 heads, 4 KV heads, vocab
152064), random weights, bf16, but 4 decoder layers (of 28) to fit the device budget, and a 1-block,
64-wide vision tower. At N = 8192 and 32768 tokens, half of them visual (images of 1024 tokens):

- training step: forward + backward (no optimizer step), eager, then with each decoder layer under
  torch.compile (where the time budget allows);
- prefill: an inference forward with the KV cache, logits of the last token only (as a server does);
- the merge alone at the same shapes: the line transformers runs, inputs_embeds.masked_scatter(mask, features),
  stock and under the switch (forward; and forward + backward for training), and our op called directly.
Each with the package's transformers switch off (stock torch masked_scatter) and on (enable()): times are
medians of REPS after a warm-up, the host synchronized with the GPU around each (wall ms); peak memory
is torch.cuda.max_memory_allocated during the call.

Why the model is called this way:
- The full HF forward runs (model.model(...) for training, model(...) for prefill), with pixel_values and a
  tiny vision tower, so the merge runs exactly where transformers puts it (with its count check and rope
  index, which sync) and the switch changes only that line. A real 675M-parameter vision tower would add
  its own large cost to both sides equally; the tiny one keeps the step's cost in the language model, which
  is the denominator the merge's share is about. Its time is recorded apart (vision_ms).
- The training loss is a cross-entropy over the vocabulary computed in chunks of 4096 tokens, each chunk
  checkpointed: HF's labels= path would hold N x 152064 logits in fp32 (20 GB at N = 32768) next to the
  activations. The lm_head's FLOPs stay in the step (its forward is recomputed once in the backward, as
  chunked-loss trainers do).
- torch.compile wraps each decoder layer (regional compilation: one compile serves the 4 identical layers,
  so it fits the budget); the embedding, vision tower, merge and loss stay eager, so the merge is the same op
  in the compiled step, and its share of a faster step is what that measurement shows.

    python bench/matters/step_share.py --out OUT     # H100: 1-2.5 min (most of it compiling); a compile starts
                                                     # only if it can end by MATTERS_DEADLINE (default: 170 s)
    python bench/matters/step_share.py --smoke       # CPU, a 64-wide model, no compile
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from torch.utils.checkpoint import checkpoint

import common
import mmmerge_triton as mm
from mmmerge_triton.integrations import transformers as mmt

REPS = 3
LOSS_CHUNK = 4096
# One compile of a decoder layer (forward + backward, shapes dynamic so it serves both N) plus its steps, and the
# steps alone at a further N: estimates for the H100 host, to start only what can finish before the deadline.
COMPILE_NEEDS_S, STEPS_NEED_S = 100, 20


def build_model(smoke: bool, device: torch.device):
    if smoke:
        text = dict(vocab_size=512, bos_token_id=1, eos_token_id=2, hidden_size=64, intermediate_size=128,
                    num_attention_heads=4, num_key_value_heads=2,
                    rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]))
        ids = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)
    else:  # Qwen2-VL-7B's language model
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                    num_key_value_heads=4, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                mrope_section=[16, 24, 24]))  # sums to head_dim/2
        ids = {}  # the real token ids (151652-151656)
    config = transformers.Qwen2VLConfig(
        text_config=dict(text, num_hidden_layers=4, max_position_embeddings=32768),
        vision_config=dict(depth=1, embed_dim=64, hidden_size=text["hidden_size"], num_heads=1, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        tie_word_embeddings=False, **ids)
    torch.manual_seed(0)
    with torch.device(device):  # initialized where it runs: 4 GB of weights drawn on the GPU in a second
        model = transformers.Qwen2VLForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model, config


def make_inputs(config, n: int, image_side: int, device: torch.device) -> dict:
    """One sequence of N tokens: images of image_side^2 merged tokens (grid 1 x 2s x 2s patches), each after a
    text span, half the tokens visual. Returns the model's kwargs and the training labels."""
    image_tokens = image_side ** 2
    n_images = (n // 2) // image_tokens
    text_per_image = n // n_images - image_tokens  # includes vision_start and vision_end
    gen = torch.Generator().manual_seed(1)
    text_ids = min(config.text_config.vocab_size - 16, 150_000)  # below the special tokens (151643 on, smoke: 500 on)
    ids = []
    for _ in range(n_images):
        ids += torch.randint(0, text_ids, (text_per_image - 2,), generator=gen).tolist()
        ids += [config.vision_start_token_id] + [config.image_token_id] * image_tokens + [config.vision_end_token_id]
    input_ids = torch.tensor([ids], device=device)
    vision = config.vision_config
    channels = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    patches = n_images * 4 * image_tokens
    labels = torch.cat([input_ids[0, 1:], input_ids.new_full((1,), -100)])  # next token; none after the last
    labels[labels == config.image_token_id] = -100  # no loss on image positions
    return dict(kwargs=dict(input_ids=input_ids,
                            pixel_values=torch.randn(patches, channels, dtype=torch.bfloat16, device=device),
                            image_grid_thw=torch.tensor([[1, 2 * image_side, 2 * image_side]] * n_images,
                                                        device=device),
                            mm_token_type_ids=(input_ids == config.image_token_id).int()),
                labels=labels, targets=int((labels != -100).sum()), images=n_images)


def training_step(model, inputs: dict):
    """Forward through the HF model (embedding, vision tower, merge, decoder layers), then the chunked loss
    over the vocabulary and its backward. No optimizer step: gradients are dropped at the next call."""
    kwargs, labels, targets = inputs["kwargs"], inputs["labels"], inputs["targets"]

    def chunk_loss(hidden, chunk_labels):
        return F.cross_entropy(model.lm_head(hidden).float(), chunk_labels, ignore_index=-100, reduction="sum")

    def step():
        model.zero_grad(set_to_none=True)
        hidden = model.model(**kwargs, use_cache=False).last_hidden_state[0]
        loss = sum(checkpoint(chunk_loss, hidden[i:i + LOSS_CHUNK], labels[i:i + LOSS_CHUNK], use_reentrant=False)
                   for i in range(0, hidden.shape[0], LOSS_CHUNK)) / targets
        loss.backward()
        return loss.detach()
    return step


def timed(fn, device: torch.device) -> tuple[float, int | None]:
    """(wall ms of one call, host and GPU synchronized around it; peak bytes allocated during it)."""
    common.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    common.synchronize(device)
    ms = (time.perf_counter() - start) * 1e3
    return ms, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def switched(fn, on: bool):
    def call():
        if not on:
            return fn()
        with mmt.enabled():
            return fn()
    return call


def routed_merges(fn) -> int:
    """How many masked_scatter calls the switch sent to the package during fn(): 0 would make on/off moot."""
    calls, original = [], mmt.masked_row_scatter
    mmt.masked_row_scatter = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    try:
        with mmt.enabled():
            fn()
    finally:
        mmt.masked_row_scatter = original
    return len(calls)


def compare(fns: dict, device: torch.device, reps: int = REPS) -> dict:
    """Each variant warmed up once, then REPS rounds alternating the variants (so drift hits all alike).
    The warm-up outputs (loss, logits, merged embeddings) are compared with the first variant's, bit for bit."""
    outputs = {name: fn() for name, fn in fns.items()}
    reference = next(iter(outputs.values()))
    comparable = isinstance(reference, torch.Tensor)
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(timed(fn, device))
    return {name: {"ms": statistics.median(ms for ms, _ in s), "ms_all": [round(ms, 3) for ms, _ in s],
                   "peak_bytes": None if s[0][1] is None else max(p for _, p in s),
                   "output_equal": torch.equal(outputs[name], reference) if comparable else None}
            for name, s in samples.items()}


def main() -> None:
    args = common.arguments(__doc__)
    device = common.device_for(args)
    # run.sh sets MATTERS_DEADLINE (epoch seconds) so the whole run fits its slot; compiling starts only before it
    deadline = float(os.environ.get("MATTERS_DEADLINE", time.time() + 170))
    tokens = (8192, 32768) if not args.smoke else (128, 256)
    image_side = 32 if not args.smoke else 4  # 1024 (smoke: 16) tokens per image
    model, config = build_model(args.smoke, device)
    text = config.text_config
    report = common.Report(args, "step_share", device, {
        "model": "Qwen2VLForConditionalGeneration, random weights, bf16, sdpa",
        "language_model": {"hidden": text.hidden_size, "intermediate": text.intermediate_size,
                           "heads": text.num_attention_heads, "kv_heads": text.num_key_value_heads,
                           "vocab": text.vocab_size, "layers": text.num_hidden_layers},
        "vision_tower": "1 block, embed_dim 64 (tiny on purpose: see the module docstring)",
        "parameters": sum(p.numel() for p in model.parameters()), "tokens": tokens, "visual_fraction": 0.5,
        "image_tokens": image_side ** 2, "reps": REPS, "loss": f"chunked cross-entropy, {LOSS_CHUNK} tokens a "
        "chunk, each checkpointed", "timing": "median wall ms, synchronized around each call"})
    common.log(f"model built: {report.data['settings']['parameters'] / 1e9:.2f} B parameters")

    for n in tokens:
        inputs = make_inputs(config, n, image_side, device)
        kwargs = inputs["kwargs"]
        train_step = training_step(model, inputs)

        def prefill():
            with torch.inference_mode():
                return model(**kwargs, use_cache=True, logits_to_keep=1).logits

        def vision():
            with torch.inference_mode():
                return model.model.get_image_features(kwargs["pixel_values"], kwargs["image_grid_thw"])

        record = {"n": n, "images": inputs["images"], "visual_rows": n // 2}
        model.train()
        record["train"] = compare({"stock": switched(train_step, False), "switch": switched(train_step, True)}, device)
        model.zero_grad(set_to_none=True)
        model.eval()
        record["prefill"] = compare({"stock": switched(prefill, False), "switch": switched(prefill, True)}, device)
        record["switch_routed_merges"] = routed_merges(prefill)
        record["vision_ms"] = compare({"vision": vision}, device)["vision"]["ms"]
        common.clean(device)

        # The merge alone, as transformers calls it: [1, N, H] embeddings, a [1, N, 1] mask, [N/2, H] features.
        mask = common.make_mask(n, n // 2, "blocks").to(device)
        embeds = torch.randn(1, n, text.hidden_size, dtype=torch.bfloat16, device=device)
        features = torch.randn(n // 2, text.hidden_size, dtype=torch.bfloat16, device=device)
        grad = torch.randn_like(embeds)
        leaf_embeds, leaf_features = embeds.clone().requires_grad_(), features.clone().requires_grad_()

        def hf_line():
            return embeds.masked_scatter(mask[None, :, None], features)

        def hf_line_train():
            leaf_embeds.grad = leaf_features.grad = None
            leaf_embeds.masked_scatter(mask[None, :, None], leaf_features).backward(grad)

        def ours_direct():  # the package without the switch's count (no sync)
            return mm.masked_row_scatter(embeds, mask[None], features)

        merge = compare({"stock": switched(hf_line, False), "switch": switched(hf_line, True),
                         "ours_direct": ours_direct}, device, reps=5)
        merge_train = compare({"stock": switched(hf_line_train, False), "switch": switched(hf_line_train, True)},
                              device, reps=5)
        for name, fn in (("stock", switched(hf_line, False)), ("switch", switched(hf_line, True)),
                         ("ours_direct", ours_direct)):
            merge[name]["device_us"] = common.timing.device_time_us(fn, device)
            merge[name]["peak_extra_bytes"] = common.timing.peak_extra_bytes(fn, device)
        for name, fn in (("stock", switched(hf_line_train, False)), ("switch", switched(hf_line_train, True))):
            merge_train[name]["peak_extra_bytes"] = common.timing.peak_extra_bytes(fn, device)
        record["merge_forward"], record["merge_train"] = merge, merge_train
        del mask, embeds, features, grad, leaf_embeds, leaf_features
        common.clean(device)
        report.add(record)
        t, p = record["train"], record["prefill"]
        common.log(f"N={n}: train {t['stock']['ms']:.1f} / {t['switch']['ms']:.1f} ms, prefill "
                   f"{p['stock']['ms']:.1f} / {p['switch']['ms']:.1f} ms, merge fwd {merge['stock']['ms']:.3f} / "
                   f"{merge['switch']['ms']:.3f} ms, fwd+bwd {merge_train['stock']['ms']:.3f} / "
                   f"{merge_train['switch']['ms']:.3f} ms (stock / switch); vision {record['vision_ms']:.1f} ms")

    # Compiled training steps: each decoder layer under torch.compile, after every eager measurement.
    compiled = {"how": "each decoder layer's .compile(dynamic=True) (regional: one compile serves the 4 layers and "
                       "both N); embedding, vision tower, merge and loss eager",
                "records": []}
    if device.type != "cuda":
        compiled["skipped"] = "CPU smoke run"
    else:
        for layer in model.model.language_model.layers:
            layer.compile(dynamic=True)  # one compile for every N (static shapes would recompile per N)
        model.train()
        for n in tokens:
            if time.time() + (COMPILE_NEEDS_S if n == tokens[0] else STEPS_NEED_S) > deadline:
                compiled["records"].append({"n": n, "skipped": "not enough of the time budget left to compile"})
                common.log(f"compiled N={n}: skipped (time budget)")
                continue
            train_step = training_step(model, make_inputs(config, n, image_side, device))

            try:
                start = time.perf_counter()
                train_step()  # the first N compiles the forward and backward graphs; a later N should reuse them
                common.synchronize(device)
                compile_s = time.perf_counter() - start
                result = compare({"stock": switched(train_step, False), "switch": switched(train_step, True)}, device)
                compiled["records"].append({"n": n, "first_call_s": round(compile_s, 1), "train": result})
                common.log(f"compiled N={n}: first call {compile_s:.0f} s, train {result['stock']['ms']:.1f} / "
                           f"{result['switch']['ms']:.1f} ms (stock / switch)")
            except Exception as error:  # a compile failure leaves the eager results standing
                compiled["records"].append({"n": n, "error": f"{type(error).__name__}: {error}"[:500]})
                common.log(f"compiled N={n}: {type(error).__name__}: {error}")
            model.zero_grad(set_to_none=True)
            common.clean(device)
            report.note("compiled", compiled)
    report.note("compiled", compiled)

    print("\nN      train ms stock/switch   prefill ms stock/switch   merge fwd ms   merge fwd+bwd ms   "
          "share of train / prefill (stock)")
    for r in report.data["records"]:
        t, p, m, mt = r["train"], r["prefill"], r["merge_forward"], r["merge_train"]
        print(f"{r['n']:<6} {t['stock']['ms']:8.1f} / {t['switch']['ms']:8.1f}   {p['stock']['ms']:8.1f} / "
              f"{p['switch']['ms']:8.1f}      {m['stock']['ms']:.3f}/{m['switch']['ms']:.3f}   "
              f"{mt['stock']['ms']:.3f}/{mt['switch']['ms']:.3f}        "
              f"{mt['stock']['ms'] / t['stock']['ms']:.2%} / {m['stock']['ms'] / p['stock']['ms']:.2%}")
    print(f"wrote {report.path}")


if __name__ == "__main__":
    main()
