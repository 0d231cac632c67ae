"""Where the decoder looked for each word: the maps are the model's own cross-attention probabilities
from the decoding run that wrote the caption, one panel per word, and asking for them changes no
caption."""

from pathlib import Path

import pytest
import skimage
import torch
import torch.nn.functional as F
from PIL import Image

import caption
from blip import BlipCaptioner
from blip.config import tiny, with_tokenizer
from blip.decoding import DecodeConfig, generate_from
from blip.text import Attention
from blip.tool.attention_map import draw
from blip.tool.captioner import Captioner

PHOTOS = Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("astronaut.png", "coffee.png", "chelsea.png"):
        Image.open(PHOTOS / name).convert("RGB").save(d / name)
        paths.append(d / name)
    return paths


def test_recorded_weights_are_the_attention_probabilities():
    """Asked for its weights, cross-attention computes softmax(q kᵀ / √hd) v explicitly: the same
    output as SDPA, and probabilities that sum to 1 over the image tokens, for every sequence,
    also when beams share one image's keys/values (G = 2 queries per image here)."""
    torch.manual_seed(0)
    attn = Attention(64, 48, heads=4).eval()
    x, image = torch.randn(4, 3, 64), torch.randn(2, 10, 48)  # 4 sequences, 2 images
    k, v = attn.keys_values(image)
    weights = []
    with torch.no_grad():
        fast, explicit = attn(x, k, v), attn(x, k, v, weights=weights)
    assert torch.allclose(explicit, fast, atol=1e-6)
    (w,) = weights
    assert w.shape == (4, 4, 3, 10) and (w >= 0).all()
    assert torch.allclose(w.sum(dim=-1), torch.ones(4, 4, 3))
    q = attn.split_heads(attn.query(x[:2]))  # sequences 0 and 1 read image 0 (the first fold)
    assert torch.allclose(w[:2], F.softmax(q @ k[:1].transpose(-2, -1) / 4, dim=-1), atol=1e-6)


@pytest.mark.parametrize("beams", [1, 3])
def test_a_model_looking_at_one_patch_lights_it_up(tokenizer, beams):
    """A decoder built so that every query matches one image token only (row 2, column 5 of the
    8 x 8 grid): every new token's map peaks there, greedy or beam search, and sums to 1."""
    model = BlipCaptioner(with_tokenizer(tiny(), tokenizer)).eval()
    grid, width, heads = model.config.vision.grid, model.config.text.width, model.config.text.heads
    head_dims = torch.arange(heads) * (width // heads)  # the first channel of each head
    target = 1 + 2 * grid + 5  # image tokens: the class token, then the patches row by row
    image = torch.zeros(1, 1 + grid * grid, width)
    image[0, target, head_dims] = 4.0
    with torch.no_grad():
        for layer in model.text_decoder.layers:
            a = layer.cross_attn
            a.query.weight.zero_()
            a.query.bias.zero_()
            a.query.bias[head_dims] = 4.0
            a.key.weight.copy_(torch.eye(width))
            a.key.bias.zero_()
    found = []
    ids = generate_from(model, image, [tokenizer.dec_id], DecodeConfig(max_new_tokens=6, num_beams=beams),
                        attention=found)
    (maps,) = found
    assert maps.shape == (len(ids[0]), 1 + grid * grid)
    assert torch.allclose(maps.sum(dim=1), torch.ones(len(ids[0])))
    assert (maps.argmax(dim=1) == target).all()
    patches = maps[:, 1:].view(-1, grid, grid)  # as word_maps lays them out: row by row
    assert (patches[:, 2, 5] == patches.amax(dim=(1, 2))).all()


@pytest.mark.parametrize("options", [dict(max_new_tokens=12), dict(num_beams=3, max_new_tokens=12, min_new_tokens=4)])
def test_one_map_per_word_and_the_same_captions(hf_taught, photos, options):
    _, folder = hf_taught
    captioner = Captioner.from_pretrained(folder, device="cpu")
    plain = captioner.caption(photos, "a picture of ", **options)
    maps = []
    assert captioner.caption(photos, "a picture of ", attention=maps, **options) == plain
    grid = captioner.model.config.vision.grid
    for text, (words, word_maps) in zip(plain, maps, strict=True):
        assert words == text.split()
        assert word_maps.shape == (len(words), grid, grid)
        assert (word_maps >= 0).all() and (word_maps.sum(dim=(1, 2)) <= 1 + 1e-5).all()
        sheet = draw(Image.open(photos[0]), words, word_maps, panel=100, columns=4)
        assert sheet.size == (400, -(-len(words) // 4) * 118)  # one 100 px panel (and its label) per word


def test_maps_change_no_caption_in_bf16(tokenizer):
    """The recorded probabilities are computed beside SDPA, whose output the decoder keeps using: the
    same captions with and without maps also where rounding is coarse (bf16) and the choices close
    (a random model, whose next tokens are nearly tied)."""
    torch.manual_seed(0)
    model = BlipCaptioner(with_tokenizer(tiny(), tokenizer))
    captioner = Captioner(model, tokenizer, "cpu", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy())
              for _ in range(16)]
    options = dict(num_beams=3, max_new_tokens=12, min_new_tokens=12)
    maps = []
    assert captioner.caption(images, **options) == captioner.caption(images, attention=maps, **options)
    assert all(torch.isfinite(m).all() for _, m in maps)


def test_cli_attention_map_draws_and_keeps_captions(hf_taught, photos, tmp_path, capsys):
    _, folder = hf_taught
    assert caption.main([str(photos[0]), "--checkpoint", str(folder)]) == 0
    plain = capsys.readouterr().out
    assert caption.main([str(photos[0]), "--checkpoint", str(folder), "--attention-map", str(tmp_path / "m.png")]) == 0
    assert capsys.readouterr().out == plain
    assert Image.open(tmp_path / "m.png").size[0] > 0
    args = [*map(str, photos), "--checkpoint", str(folder), "--attention-map", str(tmp_path / "all.png")]
    assert caption.main(args) == 0
    assert sorted(p.name for p in tmp_path.glob("all-*.png")) == sorted(f"all-{p.stem}.png" for p in photos)


@pytest.mark.parametrize("preset, shapes", [
    ("tiny", ["(1, 3, 64, 64)", "(1, 64, 128)", "(1, 65, 128)", "2 layers x keys (1, 4, 32, 65)",
              "values (1, 4, 65, 32)", "q (3, 1, 128)"]),
    ("base", ["(1, 3, 384, 384)", "(1, 576, 768)", "(1, 577, 768)", "12 layers x keys (1, 12, 64, 577)",
              "values (1, 12, 577, 64)", "q (3, 1, 768)"]),
])
def test_trace_lists_the_real_shapes(tokenizer, photos, preset, shapes):
    """--trace, read from the model's own tensors: the stages of one image, and one line per decoding
    step (beam 3: three rows, then one new token each), as many as the caption's tokens."""
    from blip.config import PRESETS
    from blip.tool.trace import Trace

    torch.manual_seed(0)
    model = BlipCaptioner(with_tokenizer(PRESETS[preset](), tokenizer))
    captioner = Captioner(model, tokenizer)
    with Trace(model, tokenizer) as trace:
        captioner.caption([photos[0]], "a picture of ", num_beams=3, max_new_tokens=4, min_new_tokens=4)
    text = "\n".join(trace.lines)
    for s in shapes:
        assert s in text, s
    stages = [line.split()[0] for line in trace.lines]
    assert stages[:5] == ["pixels", "patches", "+", "ViT", "image"]
    assert sum(line.startswith("  step") for line in trace.lines) == 4  # the prompt, then 3 new tokens


def test_cli_trace(hf_taught, photos, capsys):
    _, folder = hf_taught
    assert caption.main([str(photos[0]), "--checkpoint", str(folder), "--trace"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(str(photos[0])) and "pixels" in err and "step 0" in err


def test_map_file_names_do_not_collide():
    one = caption.map_paths("m.png", [Path("a/x.jpg")])
    assert one == {Path("a/x.jpg"): Path("m.png")}
    assert caption.map_paths("m", [Path("a/x.jpg")]) == {Path("a/x.jpg"): Path("m.png")}
    named = caption.map_paths("out/m.png", [Path("a/x.jpg"), Path("b/y.jpg")])
    assert list(named.values()) == [Path("out/m-x.png"), Path("out/m-y.png")]
    same = caption.map_paths("m.png", [Path("a/x.jpg"), Path("b/X.png")])
    assert list(same.values()) == [Path("m-1-x.png"), Path("m-2-X.png")]
