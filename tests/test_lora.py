"""LoRA (blip/lora.py): fresh adapters change nothing, merging changes nothing, loss and gradients
equal peft's LoRA on HF's BLIP, only adapters train, adapter weights save and load strictly."""

import json

import pytest
import torch

from blip import BlipCaptioner
from blip.config import tiny, with_tokenizer
from blip.lora import (
    TARGETS,
    LoraConfig,
    LoRALinear,
    add_lora,
    add_token_rows,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    parse_targets,
)
from blip.model import caption_labels, caption_loss
from blip.speed import linear
from blip.tool.convert import config_from_hf
from blip.tool.names import HF, OURS, rename
from conftest import make_hf_model

# every test here on both linear paths (blip/speed/linear.py), whatever the CPU
pytestmark = pytest.mark.usefixtures("linear_path")

CAPTIONS = ["a red dog running on the beach", "a cat", "two blue boats near a river with 3 birds"]
EVERY = LoraConfig(rank=4, alpha=8.0, targets=TARGETS)


def batch(tokenizer, size=64):
    ids, mask = tokenizer.batch(CAPTIONS)  # padded: the captions differ in length
    pixels = torch.randn(len(CAPTIONS), 3, size, size, generator=torch.Generator().manual_seed(0))
    return pixels, ids, mask


def tiny_model(tokenizer):
    torch.manual_seed(0)
    return BlipCaptioner(with_tokenizer(tiny(), tokenizer))


def randomize_adapters(model, seed=1):
    """Adapters as after some training: B nonzero, so the update and A's gradient are not zero."""
    g = torch.Generator().manual_seed(seed)
    own = lora_state_dict(model)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in own.items() if k.endswith((".lora_A", ".lora_B"))}
    load_lora_state_dict(model, {**own, **state})
    return state


def test_fresh_adapters_change_nothing(tokenizer):
    model = tiny_model(tokenizer)
    pixels, ids, mask = batch(tokenizer)

    def logits():
        with torch.no_grad():
            evaluated = model.eval()(pixels, ids, mask)
        return evaluated, model.train()(pixels, ids, mask)

    before = logits()
    names = add_lora(model, EVERY)
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    after = logits()
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_merged_equals_unmerged(tokenizer):
    """Merging folds B A into the same weight Parameters in place: the output stays, the state dict
    is the base model's again (the packed CPU copy must be remade from the changed weight)."""
    model = tiny_model(tokenizer).eval()
    pixels, ids, mask = batch(tokenizer)
    base_keys = list(model.state_dict())
    with torch.no_grad():
        base = model(pixels, ids, mask)
        names = add_lora(model, EVERY)
        weights = {n: model.get_submodule(n).weight for n in names}
        randomize_adapters(model)
        unmerged = model(pixels, ids, mask)
        merge_lora(model)
        merged = model(pixels, ids, mask)
    assert (unmerged - base).abs().max() > 0.1  # the adapters do change the output
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=0)
    assert list(model.state_dict()) == base_keys
    for n in names:
        module = model.get_submodule(n)
        assert type(module) is linear.Linear and module.weight is weights[n]


def test_autocast_bf16_train_and_eval(tokenizer):
    """Under CPU bf16 autocast the adapters train (fp32 gradients) and decode, close to fp32."""
    model = tiny_model(tokenizer)
    add_lora(model, EVERY)
    randomize_adapters(model)
    pixels, ids, mask = batch(tokenizer)
    ref = model.loss(pixels, ids, mask)
    with torch.no_grad():
        ref_logits = model.eval()(pixels, ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            logits = model(pixels, ids, mask)
        loss = model.train().loss(pixels, ids, mask)
    loss.backward()
    assert (logits.float() - ref_logits).abs().max() < 0.1 and abs(loss.item() - ref.item()) < 0.02
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# peft 0.21 reads a property transformers 5 deprecated; nothing of ours
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_loss_and_gradients_match_peft(tokenizer):
    """The same weights and adapters in HF's BLIP under peft's LoRA and in ours: same loss, same
    gradient for every A and B, on every kind of layer in the ViT and the decoder."""
    import peft

    hf = make_hf_model(tokenizer)
    ours = BlipCaptioner(config_from_hf(hf.config.to_dict(), "test")).eval()
    ours.load_state_dict(rename(hf.state_dict(), HF, OURS, "test"), strict=True)
    names = add_lora(ours, EVERY)
    state = randomize_adapters(ours)
    # peft matches the end of HF's names; "dense" is the decoder's attention outputs, MLP and head
    hf_targets = ["qkv", "projection", "fc1", "fc2", "query", "key", "value", "dense"]
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=hf_targets)
    hf = peft.get_peft_model(hf, config)

    def our_name(peft_name):  # base_model.model.<HF layer>.lora_A.default.weight -> <our layer>.lora_A
        layer, lora = peft_name.removeprefix("base_model.model.").split(".lora_")
        (ours_weight,) = rename({layer + ".weight": None}, HF, OURS, "test")
        return ours_weight.removesuffix(".weight") + ".lora_" + lora.removesuffix(".default.weight")

    theirs = {our_name(n): p for n, p in hf.named_parameters() if p.requires_grad}
    assert sorted(theirs) == sorted(state) and len(state) == 2 * len(names)
    with torch.no_grad():
        for name, p in theirs.items():
            p.copy_(state[name])

    pixels, ids, mask = batch(tokenizer)
    assert (ids[:, 0] == tokenizer.dec_id).all()
    labels = caption_labels(ids, mask, 0, tokenizer.dec_id)
    loss = caption_loss(ours(pixels, ids, mask), labels)
    ref = caption_loss(hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits, labels)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    mine = dict(ours.named_parameters())
    for name, p in theirs.items():
        assert p.grad.abs().max() > 1e-4, name  # a gradient worth comparing
        assert torch.allclose(mine[name].grad, p.grad, atol=1e-5, rtol=0), name


# peft 0.21 reads a property transformers 5 deprecated; nothing of ours
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:You have requested `ensure_weight_tying`:UserWarning")
def test_token_rows_match_peft_trainable_tokens(tokenizer):
    """LoRA plus trainable rows of the tied word embeddings (train.py --lora-tokens data) against peft's
    LoRA with trainable_token_indices and ensure_weight_tying on HF's BLIP, the same layers, rows and
    values: the same loss, and the same gradients for every A, B and row. peft 0.21's tied LM head
    leaves out the head's bias (trainable_tokens/layer.py: F.linear(x, W) without it), so the bias is
    zero here; test_token_rows_equal_autograd_on_the_rows covers it."""
    import peft

    hf = make_hf_model(tokenizer)
    with torch.no_grad():
        hf.text_decoder.cls.predictions.bias.zero_()
    ours = BlipCaptioner(config_from_hf(hf.config.to_dict(), "test")).eval()
    ours.load_state_dict(rename(hf.state_dict(), HF, OURS, "test"), strict=True)
    pixels, ids, mask = batch(tokenizer)
    rows = sorted(set(ids[mask.bool()].tolist()) - {tokenizer.pad_id})[::2]  # some tokens of the batch, not all
    add_lora(ours, LoraConfig(rank=4, alpha=8.0, targets=("query", "value")))
    add_token_rows(ours, rows)
    state = randomize_adapters(ours)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # rows as after some training: moved away from the matrix they came from
        ours.text_decoder.embeddings.word.rows.add_(0.1 * torch.randn(len(rows), 64, generator=g))
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"],
                             trainable_token_indices=rows, ensure_weight_tying=True)
    hf = peft.get_peft_model(hf, config)
    words = hf.base_model.model.text_decoder.bert.embeddings.word_embeddings
    delta = words.token_adapter.trainable_tokens_delta["default"]
    mine = dict(ours.named_parameters())
    theirs = {}
    for name, p in hf.named_parameters():
        if p.requires_grad and ".lora_" in name:
            layer, lora = name.removeprefix("base_model.model.").split(".lora_")
            (weight,) = rename({layer + ".weight": None}, HF, OURS, "test")
            theirs[weight.removesuffix(".weight") + ".lora_" + lora.removesuffix(".default.weight")] = p
    theirs["text_decoder.embeddings.word.rows"] = delta
    assert sorted(theirs) == sorted(n for n, p in mine.items() if p.requires_grad)
    assert [n for n, p in hf.named_parameters() if p.requires_grad and "trainable_tokens" in n] == \
        ["base_model.model.text_decoder.bert.embeddings.word_embeddings.token_adapter.trainable_tokens_delta.default"]
    with torch.no_grad():
        for name, p in theirs.items():
            p.copy_(mine[name])
    labels = caption_labels(ids, mask, 0, tokenizer.dec_id)
    loss = caption_loss(ours(pixels, ids, mask), labels)
    ref = caption_loss(hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits, labels)
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    for name, p in theirs.items():
        assert p.grad.abs().max() > 1e-4, name  # a gradient worth comparing
        assert torch.allclose(mine[name].grad, p.grad, atol=1e-5, rtol=0), name
    assert state.keys() <= set(lora_state_dict(ours))


def test_token_rows_equal_autograd_on_the_rows(tokenizer):
    """With the LM head's bias (which peft drops): TokenRows give the loss of the plain model, and each row's
    gradient is that row of the gradient of the whole (tied) embedding matrix, input and head together."""
    plain, model = tiny_model(tokenizer), tiny_model(tokenizer)
    with torch.no_grad():
        for m in (plain, model):
            m.text_decoder.head.bias.copy_(torch.randn(m.text_decoder.head.bias.shape,
                                                       generator=torch.Generator().manual_seed(4)))
    pixels, ids, mask = batch(tokenizer)
    rows = sorted(set(ids[mask.bool()].tolist()))[1::2]
    add_lora(model, EVERY)
    add_token_rows(model, rows)
    randomize_adapters(model, seed=5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.dim() == 2 and p.shape[0] != len(rows):
                p.zero_()  # adapters that change nothing: the model is the plain one
    for p in plain.parameters():
        p.requires_grad_(False)
    plain.text_decoder.embeddings.word.weight.requires_grad_(True)
    labels = caption_labels(ids, mask, 0, tokenizer.dec_id)
    for m in (plain, model):
        caption_loss(m.eval()(pixels, ids, mask), labels).backward()
    grad = plain.text_decoder.embeddings.word.weight.grad
    assert grad[rows].abs().max() > 1e-4
    assert torch.allclose(model.text_decoder.embeddings.word.rows.grad, grad[rows], atol=1e-6)


def test_token_rows_save_load_and_merge(tokenizer):
    """Rows go with the adapters (their ids too), load strictly onto a fresh model, and merging writes them
    into the embedding matrix: the same logits before and after, through both the input and the head."""
    model = tiny_model(tokenizer)
    add_lora(model, EVERY)
    randomize_adapters(model)
    rows = add_token_rows(model, [5, 9, 12, 40])
    with torch.no_grad():
        rows.rows.add_(torch.randn(rows.rows.shape, generator=torch.Generator().manual_seed(3)))
    pixels, ids, mask = batch(tokenizer)
    ids[0, 1:4] = torch.tensor([5, 9, 40])  # the trained rows are read as well as scored
    with torch.no_grad():
        before = model.eval()(pixels, ids, mask)
    state = lora_state_dict(model)
    assert {k for k in state if not k.endswith((".lora_A", ".lora_B"))} == \
        {"text_decoder.embeddings.word.rows", "text_decoder.embeddings.word.ids"}
    fresh = tiny_model(tokenizer)
    add_lora(fresh, EVERY)
    load_lora_state_dict(fresh, state)
    merge_lora(model)
    assert type(model.text_decoder.embeddings.word).__name__ == "Embedding"
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(pixels, ids, mask), before, atol=1e-6)
        assert torch.allclose(model(pixels, ids, mask), before, atol=1e-5)
    merged = model.text_decoder.embeddings.word.weight[[5, 9, 12, 40]]
    assert torch.equal(merged, state["text_decoder.embeddings.word.rows"])


def test_only_adapters_train_and_their_weights_load_strictly(tokenizer):
    model = tiny_model(tokenizer)
    names = add_lora(model, EVERY)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    layers = [model.get_submodule(n) for n in names]
    assert sum(p.numel() for p in trainable.values()) == sum(4 * (m.in_features + m.out_features) for m in layers)
    assert model.text_decoder.embeddings.word.weight.requires_grad is False  # the tied LM-head matrix too
    for m in layers:  # peft's draw: A uniform in +-1/sqrt(in) (kaiming, a=sqrt(5)), B zero
        bound = m.in_features**-0.5
        assert m.lora_A.abs().max() <= bound and m.lora_A.std() > 0.5 * bound and not m.lora_B.any()

    state = randomize_adapters(model)
    saved = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert sorted(saved) == sorted(state) and all(torch.equal(saved[k], state[k]) for k in state)
    randomize_adapters(model, seed=2)
    load_lora_state_dict(model, saved)
    assert all(torch.equal(v, saved[k]) for k, v in lora_state_dict(model).items())

    first = "text_decoder.layers.0.self_attn.query.lora_A"
    missing = {k: v for k, v in saved.items() if k != first}
    unknown = {**saved, "text_decoder.layers.9.self_attn.query.lora_A": saved[first]}
    wrong_shape = {**saved, first: saved[first][:2]}
    for bad, message in ((missing, "1 missing"), (unknown, "1 unknown"), (wrong_shape, "shape")):
        with pytest.raises(ValueError, match=message):
            load_lora_state_dict(model, bad)
    assert all(torch.equal(v, saved[k]) for k, v in lora_state_dict(model).items())  # nothing half-loaded


def test_targets_parse_and_scope(tokenizer):
    assert parse_targets("qkv, text.query,vision.fc1") == ("qkv", "text.query", "vision.fc1")
    for bad in ("query,attention", "audio.query", ""):
        with pytest.raises(ValueError, match="choose from qkv, proj, fc1, fc2, query, key, value, out, dense"):
            parse_targets(bad)
    config = LoraConfig(rank=2, alpha=4.0, targets=("text.query", "vision.fc1"))
    assert LoraConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config

    model = tiny_model(tokenizer)
    names = add_lora(model, config)
    queries = [f"text_decoder.layers.{i}.{a}.query" for i in range(2) for a in ("self_attn", "cross_attn")]
    assert names == [f"visual_encoder.blocks.{i}.mlp.fc1" for i in range(4)] + queries
    with pytest.raises(ValueError, match="no linear layer"):
        add_lora(tiny_model(tokenizer), LoraConfig(targets=("vision.query",)))


def test_adapter_gradients_equal_with_and_without_recompute(tokenizer):
    """LoRA adds its update to its layer's output in place; rerunning whole blocks in backward
    (blip/speed/recompute.py "full") must not change a gradient, in fp32 or under bf16 autocast. ("elementwise"
    keeps results that the in-place update would change: train.py refuses it with --lora.)"""
    model = tiny_model(tokenizer).train()
    add_lora(model, EVERY)
    randomize_adapters(model)
    pixels, ids, mask = batch(tokenizer)
    labels = caption_labels(ids, mask, 0, tokenizer.dec_id)
    for amp in (False, True):
        grads = {}
        for mode in ("none", "full"):
            model.set_recompute(mode)
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                caption_loss(model(pixels, ids, mask), labels).backward()
            grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(torch.equal(grads["full"][n], grads["none"][n]) for n in grads["none"]), amp
