"""BlipRetrieval against HF BlipForImageTextRetrieval on random weights: the ITM match probability and
the ITC similarity matrix, tiny and base size, padded texts; names HF -> ours -> HF unchanged."""

import pytest
import torch

from blip import BlipRetrieval
from blip.tool.convert import config_from_hf
from blip.tool.names import HF, ORIGINAL, OURS, RETRIEVAL, rename
from conftest import captions_batch, corpus, hf_config, randomize


def models(tokenizer, size: str):
    """(HF BlipForImageTextRetrieval with random weights, ours holding the same weights)."""
    from transformers import BlipForImageTextRetrieval

    tiny = size.startswith("tiny")
    config = hf_config(tokenizer, size, image_size=64 if tiny else 384)
    config.image_text_hidden_size = 32 if tiny else 256
    torch.manual_seed(0)
    hf = randomize(BlipForImageTextRetrieval(config).eval())
    ours = BlipRetrieval(config_from_hf(config.to_dict(), "test"))  # embed_dim: image_text_hidden_size
    ours.load_state_dict(rename(hf.state_dict(), HF, OURS, "test", RETRIEVAL), strict=True)
    return hf, ours.eval()


@pytest.mark.parametrize("size, tol", [("tiny", 1e-5), ("base", 1e-4)])
def test_itm_and_itc_equal_hf(tokenizer, size, tol):
    hf, ours = models(tokenizer, size)
    n, side = 3, ours.config.vision.image_size
    pixels = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))
    ids, mask = captions_batch(tokenizer, ["a dog", *corpus(n - 1, seed=2)])
    ids[:, 0] = tokenizer.cls_id  # as HF's processor writes texts for retrieval
    assert (mask == 0).any()  # padded texts
    with torch.no_grad():
        itm = ours.itm(pixels, ids, mask)
        itc = ours.itc(pixels, ids, mask)
        hf_itm = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
        hf_itc = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
    assert itm.shape == (n,) and itc.shape == (n, n)
    assert (itm - hf_itm.softmax(dim=-1)[:, 1]).abs().max() <= tol
    assert (itc - hf_itc).abs().max() <= tol
    assert itm.std() > 0 and itc.std() > 0  # the pairs differ: the comparison is not of constants


def test_names_round_trip_bit_identical(tokenizer):
    hf, ours = models(tokenizer, "tiny")
    back = rename(ours.state_dict(), OURS, HF, "test", RETRIEVAL)
    theirs = hf.state_dict()
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_the_folder_says_which_model_it_holds(tokenizer, ours_tiny, tmp_path, capsys):
    """save_pretrained / from_pretrained round trip; the wrong class gets one line saying what the folder
    holds, from the API and from caption.py."""
    import caption
    from blip import BlipCaptioner
    from blip.checkpoint import CheckpointError

    _, ours = models(tokenizer, "tiny")
    ours.save_pretrained(tmp_path / "itm", tokenizer)
    again = BlipRetrieval.from_pretrained(tmp_path / "itm")
    assert again.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values(), strict=True))
    with pytest.raises(CheckpointError, match="holds a BlipRetrieval model, not the BlipCaptioner this needs"):
        BlipCaptioner.from_pretrained(tmp_path / "itm")
    with pytest.raises(CheckpointError, match="holds a BlipCaptioner model, not the BlipRetrieval this needs"):
        BlipRetrieval.from_pretrained(ours_tiny)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    assert caption.main([str(image), "--checkpoint", str(tmp_path / "itm")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a BlipRetrieval model" in err


def test_convert_weights_takes_retrieval_snapshots_both_ways(tokenizer, vocab_dir, tmp_path, capsys):
    """An HF BlipForImageTextRetrieval snapshot -> convert_weights.py -> our BlipRetrieval folder (the
    same ITM probabilities) -> --to-hf -> the same tensors and a model HF loads."""
    from safetensors.torch import load_file
    from transformers import BlipForImageTextRetrieval

    import convert_weights

    hf, _ = models(tokenizer, "tiny")
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_text((vocab_dir / "vocab.txt").read_text())
    assert convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = BlipRetrieval.from_pretrained(tmp_path / "ours")
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ids, mask = captions_batch(tokenizer, ["a dog", "a red cat on a chair"])
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score.softmax(dim=-1)[:, 1]
        assert (ours.itm(pixels, ids, mask) - expected).abs().max() <= 1e-5
    assert convert_weights.main(["--to-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    again = BlipForImageTextRetrieval.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        score = again(input_ids=ids, pixel_values=pixels, attention_mask=mask).itm_score
        assert torch.equal(score.softmax(dim=-1)[:, 1], expected)
    capsys.readouterr()


def test_original_retrieval_pth_equals_hf_path(tokenizer, vocab_dir, tmp_path, capsys):
    """An original BLIP retrieval file (its names, plus momentum encoders and queues, which are skipped)
    converts to the same tensors as the HF snapshot of the same weights."""
    from safetensors.torch import load_file

    import convert_weights

    hf, _ = models(tokenizer, "tiny-hd64")  # 64-wide heads: original files do not record heads
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_text((vocab_dir / "vocab.txt").read_text())
    assert convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "from_hf")]) == 0
    state = rename(hf.state_dict(), HF, ORIGINAL, "test", RETRIEVAL)
    state.update({"visual_encoder_m.cls_token": torch.zeros(1), "text_proj_m.weight": torch.zeros(1),
                  "image_queue": torch.zeros(1), "idx_queue": torch.zeros(1), "temp": torch.zeros(())})
    torch.save({"model": state, "epoch": 5}, tmp_path / "model_base_retrieval_coco.pth")
    args = [str(tmp_path / "model_base_retrieval_coco.pth"), str(tmp_path / "ours"), "--tokenizer",
            str(vocab_dir / "vocab.txt")]
    assert convert_weights.main(args) == 0
    a = load_file(str(tmp_path / "from_hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config_hf = BlipRetrieval.from_pretrained(tmp_path / "from_hf").config
    config_orig = BlipRetrieval.from_pretrained(tmp_path / "ours").config
    assert config_orig.vision.ln_eps == 1e-6 and config_orig.embed_dim == config_hf.embed_dim == 32
    capsys.readouterr()


def test_rerank_prints_the_best_scored_candidate(tokenizer, hf_taught, tmp_path, capsys, monkeypatch):
    """caption.py --rerank: N candidates per image, the matching model's best one printed with its score.
    With a scorer whose answer is known (the longest candidate wins), that one is printed; with the real
    matching head, the printed score is the model's score of the printed caption."""
    import json

    from PIL import Image

    import caption
    from blip.tool.captioner import Matcher

    _, ours = models(tokenizer, "tiny")
    ours.save_pretrained(tmp_path / "itm", tokenizer)
    _, captioner_folder = hf_taught
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"p{i}.png")
    args = [str(tmp_path / "p0.png"), str(tmp_path / "p1.png"), "--checkpoint", str(captioner_folder),
            "--rerank", str(tmp_path / "itm"), "--candidates", "4", "--seed", "0", "--format", "jsonl"]

    seen = []

    def longest_wins(self, image, texts):
        seen.append(texts)
        return torch.tensor([len(t) / 100 for t in texts])

    with monkeypatch.context() as m:
        m.setattr(Matcher, "scores", longest_wins)
        assert caption.main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all(1 <= len(texts) <= 4 for texts in seen) and any(len(t) > 1 for t in seen)
    for row, texts in zip(rows, seen, strict=True):
        best = max(texts, key=len)
        assert row["caption"] == best and row["score"] == pytest.approx(len(best) / 100)

    assert caption.main(args) == 0  # the real matching head
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    matcher = Matcher.from_pretrained(tmp_path / "itm", device="cpu")
    for i, row in enumerate(rows):
        assert row["score"] == pytest.approx(float(matcher.scores(tmp_path / f"p{i}.png", [row["caption"]])[0]),
                                             abs=1e-5)


def test_snapshot_without_architectures_is_told_by_its_weights(tokenizer, vocab_dir, tmp_path, capsys):
    import json

    import caption
    import convert_weights

    hf, _ = models(tokenizer, "tiny")
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.txt").write_text((vocab_dir / "vocab.txt").read_text())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert BlipRetrieval.from_pretrained(tmp_path / "ours").config.embed_dim == 32
    with pytest.raises(SystemExit):  # maps follow the beam caption, not a reranked one
        caption.parse_args(["x.png", "--rerank", "itm", "--attention-map", "m.png"])
    capsys.readouterr()
