"""Shared fixtures: a WordPiece vocab trained here, and random HF reference models saved with
`save_pretrained` (no downloads: the real BLIP weights are not reachable from tests)."""

import random

import pytest
import torch

from blip.speed import linear
from blip.tokenizer import Tokenizer

COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
THINGS = ["dog", "cat", "ball", "car", "house", "tree", "bird", "boat", "horse", "player", "football"]
PLACES = ["on the beach", "in a field", "near a river", "under a tree", "on a street", "in the snow"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        f"a picture of a {rng.choice(COLORS)} {rng.choice(THINGS)} {rng.choice(['sitting', 'running', 'standing'])} "
        f"{rng.choice(PLACES)}, with {rng.randint(2, 9)} {rng.choice(THINGS)}s!"
        for _ in range(n)
    ]


@pytest.fixture(params=["packed-linear", "f-linear"])
def linear_path(request, monkeypatch):
    """Both of blip/speed/linear.py's paths on every CPU: the packed oneDNN one (the default on AMD's,
    forced on here wherever PyTorch has it) and plain F.linear (the default on Intel's). A test module
    takes both with `pytestmark = pytest.mark.usefixtures("linear_path")`."""
    if request.param == "packed-linear" and not linear.AVAILABLE:
        pytest.skip("this PyTorch has no oneDNN linear")
    monkeypatch.setattr(linear, "ONEDNN", request.param == "packed-linear")
    return request.param


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory):
    """vocab.txt (BERT format, no [DEC]/[ENC]) and the matching tokenizer.json."""
    d = tmp_path_factory.mktemp("vocab")
    tok = Tokenizer.train(corpus(), vocab_size=300)
    vocab = tok._tok.get_vocab(with_added_tokens=False)
    (d / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    Tokenizer.from_file(d / "vocab.txt").save(d / "tokenizer.json")
    return d


@pytest.fixture(scope="session")
def tokenizer(vocab_dir):
    return Tokenizer.from_file(vocab_dir / "tokenizer.json")


def hf_config(tokenizer, size: str = "tiny", image_size: int = 64):
    from transformers import BlipConfig

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.dec_id, sep_token_id=tokenizer.sep_id,
               pad_token_id=tokenizer.pad_id)
    if size in ("tiny", "tiny-hd64"):
        # tiny-hd64: 64-wide heads, like every released BLIP (original files do not record heads)
        width, heads = (64, 4) if size == "tiny" else (128, 2)
        text = dict(hidden_size=width, intermediate_size=256, num_hidden_layers=2, num_attention_heads=heads,
                    max_position_embeddings=64, **ids)
        vision = dict(hidden_size=width, intermediate_size=256, num_hidden_layers=2, num_attention_heads=heads,
                      image_size=image_size, patch_size=16)
    else:  # the hub's blip-image-captioning-base
        text = dict(num_attention_heads=12, **ids)
        vision = dict(image_size=384, patch_size=16)
    return BlipConfig(text_config=text, vision_config=vision)


def randomize(model, seed: int = 0):
    """Give every parameter distinct random values (HF's init leaves LayerNorms at 1/0 and the ViT
    near zero, which would make parity tests weak)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.copy_(1.0 + noise if "norm" in name.lower() and name.endswith("weight") else noise)
    return model


def make_hf_model(tokenizer, size="tiny", seed=0, image_size=64):
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(seed)
    return randomize(BlipForConditionalGeneration(hf_config(tokenizer, size, image_size)).eval(), seed)


def save_hf_snapshot(model, tokenizer, vocab_dir, folder):
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text((vocab_dir / "vocab.txt").read_text())
    return folder


@pytest.fixture(scope="session")
def hf_tiny(tokenizer, vocab_dir, tmp_path_factory):
    """(HF model, snapshot folder) of a random tiny BlipForConditionalGeneration."""
    model = make_hf_model(tokenizer)
    return model, save_hf_snapshot(model, tokenizer, vocab_dir, tmp_path_factory.mktemp("hf_tiny"))


@pytest.fixture(scope="session")
def ours_tiny(hf_tiny, tmp_path_factory):
    """Our checkpoint folder converted from `hf_tiny` by convert_weights.py."""
    import convert_weights

    out = tmp_path_factory.mktemp("ours_tiny")
    assert convert_weights.main([str(hf_tiny[1]), str(out)]) == 0
    return out


def captions_batch(tokenizer, texts, prompt=""):
    ids, mask = tokenizer.batch([prompt + t for t in texts])
    return ids, mask


def taught_images(n: int = 8, size: int = 64, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def hf_taught(tokenizer, vocab_dir, tmp_path_factory):
    """(HF model, our converted folder): a tiny reference model taught one caption for each of
    8 images for a few steps, so its captions differ by image and its beams disagree."""
    import convert_weights

    model = make_hf_model(tokenizer, seed=3)
    images = taught_images()
    ids, mask = tokenizer.batch(corpus(len(images), seed=5))
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(40):
        loss = model(pixel_values=images, input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    snapshot = save_hf_snapshot(model, tokenizer, vocab_dir, tmp_path_factory.mktemp("hf_taught"))
    ours = tmp_path_factory.mktemp("ours_taught")
    assert convert_weights.main([str(snapshot), str(ours)]) == 0
    return model, ours
