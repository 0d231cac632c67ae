"""BlipCaptioner against HF BlipForConditionalGeneration: logits, loss, training step, cache."""

from collections import Counter
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blip import BlipCaptioner
from blip.config import tiny, with_tokenizer
from blip.model import caption_labels, caption_loss
from conftest import make_hf_model, save_hf_snapshot

# every test here on both linear paths (blip/speed/linear.py), whatever the CPU
pytestmark = pytest.mark.usefixtures("linear_path")

CAPTIONS = ["a red dog running on the beach", "a cat", "two blue boats near a river with 3 birds"]


def batch(tokenizer, prompt="", size=64, n=3, seed=0):
    ids, mask = tokenizer.batch([prompt + c for c in CAPTIONS[:n]])
    pixels = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return pixels, ids, mask


def test_tiny_logits_match_hf_with_padding(hf_tiny, ours_tiny, tokenizer):
    hf, _ = hf_tiny
    ours = BlipCaptioner.from_pretrained(ours_tiny)
    pixels, ids, mask = batch(tokenizer)
    assert (mask == 0).any()  # the batch really is padded
    with torch.no_grad():
        a = ours(pixels, ids, mask)
        b = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    assert a.shape == (3, ids.shape[1], len(tokenizer))
    assert (a - b).abs().max() <= 1e-5


def test_base_logits_match_hf(tokenizer, vocab_dir, tmp_path):
    """The full base size (ViT-B/16 at 384 px, 12-layer decoder, 224 M parameters)."""
    import convert_weights

    hf = make_hf_model(tokenizer, size="base", seed=1)
    save_hf_snapshot(hf, tokenizer, vocab_dir, tmp_path / "hf")
    assert convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = BlipCaptioner.from_pretrained(tmp_path / "ours")
    assert ours.config.vision.num_tokens == 577 and ours.config.text.heads == 12
    pixels, ids, mask = batch(tokenizer, size=384, n=2)
    with torch.no_grad():
        a = ours(pixels, ids, mask)
        b = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() <= 1e-4


def test_base_preset_has_blip_base_size():
    from blip.config import base

    n_params = sum(p.numel() for p in BlipCaptioner(base()).parameters())
    assert 223e6 < n_params < 225e6, n_params  # the base captioner: ~224 M parameters


def test_inference_encodes_images_a_few_at_a_time_with_the_same_tokens(tokenizer):
    """encode_image in inference on the CPU runs the ViT VIT_CHUNK images at a time: the tokens are the whole
    batch's, and the training path (gradients) still runs the batch at once."""
    from blip import model as blip_model

    torch.manual_seed(0)
    model = BlipCaptioner(with_tokenizer(tiny(), tokenizer)).eval()
    size = model.config.vision.image_size
    pixels = torch.randn(2 * blip_model.VIT_CHUNK + 1, 3, size, size)
    calls = []
    hook = model.visual_encoder.register_forward_pre_hook(lambda _, args: calls.append(len(args[0])))
    with torch.no_grad():
        whole = model.visual_encoder(pixels)
        calls.clear()
        chunked = model.encode_image(pixels)
    assert calls == [blip_model.VIT_CHUNK, blip_model.VIT_CHUNK, 1]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    calls.clear()
    model.encode_image(pixels)  # gradients recorded: one call
    assert calls == [len(pixels)]
    hook.remove()


def test_loss_is_blip_loss(hf_tiny, ours_tiny, tokenizer):
    """Equals HF's loss once HF is given what original BLIP does: smoothing 0.1, pads and prompt
    ignored. Pads cannot change it; a [CLS]-first batch is refused."""
    hf, _ = hf_tiny
    ours = BlipCaptioner.from_pretrained(ours_tiny)
    prompt = "a picture of "
    n_prompt = len(tokenizer.tokens(prompt))
    pixels, ids, mask = batch(tokenizer, prompt=prompt)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : 1 + n_prompt] = -100
    assert torch.equal(caption_labels(ids, mask, n_prompt, tokenizer.dec_id), labels)
    hf.text_decoder.label_smoothing = 0.1
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels).loss
        loss = ours.loss(pixels, ids, mask, prompt_length=n_prompt)
        assert abs(loss.item() - ref.item()) <= 1e-5
        # train.py's form: the sum over caption tokens, divided by their count over the whole batch
        logits = ours(pixels, ids, mask)
        summed = caption_loss(logits, labels, 0.1, "sum") / (labels[:, 1:] != -100).sum()
        assert abs(summed.item() - ref.item()) <= 1e-5
        # three more pad columns change nothing
        pad = torch.full((3, 3), tokenizer.pad_id)
        longer = ours.loss(pixels, torch.cat([ids, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1), n_prompt)
        assert abs(longer.item() - loss.item()) <= 1e-5
        # the prompt is not a target: a loss that counts it differs
        assert abs(ours.loss(pixels, ids, mask, prompt_length=0).item() - loss.item()) > 1e-3
    bad = ids.clone()
    bad[:, 0] = tokenizer.cls_id
    with pytest.raises(ValueError, match=r"start with \[DEC\]"):
        ours.loss(pixels, bad, mask)


def test_train_step_is_finite_and_reaches_every_weight(tokenizer):
    torch.manual_seed(0)
    model = BlipCaptioner(with_tokenizer(tiny(), tokenizer)).train()
    pixels, ids, mask = batch(tokenizer)
    loss = model.loss(pixels, ids, mask)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


class OpsRun(TorchDispatchMode):
    """Counts the ATen ops that run while it is active (names without overloads)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("mode", "amp", "dropout"), [
    ("elementwise", None, 0.0), ("elementwise", torch.bfloat16, 0.0), ("elementwise", None, 0.1),
    ("full", None, 0.0), ("full", torch.bfloat16, 0.0)])
def test_recompute_gives_same_gradients(tokenizer, mode, amp, dropout):
    """Recomputing in backward changes what is kept, not the maths. "elementwise" keeps products and
    attention (no addmm or attention kernel runs in backward) and recomputes layer norms (they run in
    backward): the same gradients bit for bit, under bf16 autocast and with dropout too. "full" reruns
    whole blocks, products included: the same gradients to fp32 rounding."""
    config = with_tokenizer(tiny(), tokenizer)
    torch.manual_seed(0)
    model = BlipCaptioner(replace(config, text=replace(config.text, dropout=dropout))).train()
    pixels, ids, mask = batch(tokenizer)

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks for both runs
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = model.loss(pixels, ids, mask)
        with OpsRun() as backward:
            loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, backward.ops

    model.set_recompute("none")
    plain, ops = grads()
    assert ops["native_layer_norm"] == ops["addmm"] == 0  # plain autograd recomputes nothing
    model.set_recompute(mode)
    again, ops = grads()
    assert ops["native_layer_norm"] > 0
    attention = ops["_scaled_dot_product_flash_attention_for_cpu"]
    if mode == "elementwise":
        assert ops["addmm"] == 0 and (attention == 0 or dropout > 0)
    else:
        assert ops["addmm"] > 0 and attention > 0
    for n, g in plain.items():
        if mode == "elementwise":
            assert torch.equal(again[n], g), n
        else:
            assert torch.allclose(again[n], g, atol=1e-6), n


def test_recompute_mode_is_checked(tokenizer):
    model = BlipCaptioner(with_tokenizer(tiny(), tokenizer))
    with pytest.raises(ValueError, match="recompute mode"):
        model.set_recompute("sometimes")


def test_cached_decoding_matches_full_forward(ours_tiny, tokenizer):
    """Feeding tokens one at a time through the KV cache gives the teacher-forced logits, also
    when several sequences (beams) share one image's cross-attention keys/values."""
    model = BlipCaptioner.from_pretrained(ours_tiny)
    pixels, ids, _ = batch(tokenizer, n=2)
    ids = ids[:, :6]
    beams = 3
    with torch.no_grad():
        image = model.encode_image(pixels)  # (2, N, C)
        seqs = ids.repeat_interleave(beams, 0)  # (6, T): 3 sequences per image
        seqs[1::beams, 3:] = torch.randint(5, len(tokenizer) - 2, (2, 3))  # beams that differ
        full = model.text_decoder(seqs, image_embeds=image.repeat_interleave(beams, 0))
        cache = model.new_cache(image)  # keys/values per image, not per beam
        assert cache.image_kv[0][0].shape[0] == 2
        first = model.text_decoder(seqs[:, :2], cache=cache)  # a two-token prefix at once
        steps = [model.text_decoder(seqs[:, t : t + 1], cache=cache) for t in range(2, seqs.shape[1])]
    incremental = torch.cat([first, *steps], dim=1)
    assert (incremental - full).abs().max() <= 1e-5


def test_save_and_load_round_trip(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = BlipCaptioner(with_tokenizer(tiny(), tokenizer))
    model.save_pretrained(tmp_path, tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    again = BlipCaptioner.from_pretrained(tmp_path)
    assert again.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
