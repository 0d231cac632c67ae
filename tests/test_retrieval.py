"""BlipRetrieval against HF BlipForImageTextRetrieval on random weights: the ITM match probability and
the ITC similarity matrix, tiny and base size, padded texts; names HF -> ours -> HF unchanged."""

from dataclasses import replace

import pytest
import torch

from blip import BlipRetrieval
from blip.convert import HF, OURS, RETRIEVAL, config_from_hf, rename
from conftest import captions_batch, corpus, hf_config, randomize


def models(tokenizer, size: str):
    """(HF BlipForImageTextRetrieval with random weights, ours holding the same weights)."""
    from transformers import BlipForImageTextRetrieval

    config = hf_config(tokenizer, size, image_size=64 if size == "tiny" else 384)
    config.image_text_hidden_size = 32 if size == "tiny" else 256
    torch.manual_seed(0)
    hf = randomize(BlipForImageTextRetrieval(config).eval())
    ours = BlipRetrieval(replace(config_from_hf(config.to_dict(), "test"), embed_dim=config.image_text_hidden_size))
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
