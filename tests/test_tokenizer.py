"""Our tokenizer gives the ids HF's BertTokenizerFast gives on the same vocab, [DEC]/[ENC] included."""

import pytest
import torch
from transformers import BertTokenizerFast

from blip.tokenizer import Tokenizer
from conftest import corpus

TEXTS = corpus(50, seed=1) + [
    "A RED Dog, running on the BEACH!!",
    "café naïve résumé Ångström",  # accents are stripped by bert-base-uncased
    "xylophone zebra quokka",  # unknown words
    "a dog\tand\na cat   with  spaces",
    "中文 字 and a dog",  # CJK characters are split one by one
    "[DEC] a dog [ENC] on the beach [SEP] [PAD] [MASK]",
    "a [dec] dog",  # special tokens are matched case-sensitively, as HF does
    "",
    "supercalifragilisticexpialidocious" * 4,  # longer than WordPiece's 100-character limit
]


def hf_tokenizer(vocab_file):
    hf = BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True)
    hf.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})  # as BLIP does
    return hf


@pytest.mark.parametrize("source", ["vocab.txt", "tokenizer.json"])
def test_ids_equal_bert_tokenizer_fast(vocab_dir, source):
    ours = Tokenizer.from_file(vocab_dir / source)
    hf = hf_tokenizer(vocab_dir / "vocab.txt")
    assert len(ours) == len(hf)
    assert (ours.dec_id, ours.enc_id) == tuple(hf.convert_tokens_to_ids(["[DEC]", "[ENC]"]))
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.tokens(text) == hf(text, add_special_tokens=False)["input_ids"], text


def test_bert_base_layout_gives_blip_ids(tmp_path, vocab_dir):
    """With bert-base-uncased's layout (30522 entries), [DEC] is 30522 and [ENC] 30523."""
    trained = [t for t in (vocab_dir / "vocab.txt").read_text().split("\n") if t and not t.startswith("[")]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + trained
    vocab += [f"filler{i}" for i in range(30522 - len(vocab))]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    ours = Tokenizer.from_file(tmp_path / "vocab.txt")
    assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id) == (0, 100, 101, 102)
    assert (ours.dec_id, ours.enc_id, len(ours)) == (30522, 30523, 30524)
    hf = hf_tokenizer(tmp_path / "vocab.txt")
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text


def test_caption_encoding_and_batch(tokenizer):
    text = "a red dog on the beach"
    ids = tokenizer.encode_caption(text)
    assert ids[0] == tokenizer.dec_id and ids[-1] == tokenizer.sep_id
    assert ids[1:-1] == tokenizer.encode(text)[1:-1]
    assert tokenizer.encode_prompt("a picture of ") == [tokenizer.dec_id, *tokenizer.tokens("a picture of")]
    ids, mask = tokenizer.batch(["a dog", text, "a cat on a street with 3 birds"], max_length=6)
    assert ids.shape == mask.shape and ids.dtype == mask.dtype == torch.long
    assert ids.shape[1] == 6  # truncated to max_length
    assert (ids[:, 0] == tokenizer.dec_id).all()
    lengths = mask.sum(1)
    for row, n in zip(ids, lengths, strict=True):
        assert row[n - 1] == tokenizer.sep_id  # truncation keeps the closing [SEP]
        assert (row[n:] == tokenizer.pad_id).all()


def test_decode_matches_hf(vocab_dir, tokenizer):
    hf = hf_tokenizer(vocab_dir / "vocab.txt")
    for text in corpus(20, seed=2):
        ids = tokenizer.encode_caption(text)
        assert tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tokenizer.decode(torch.tensor(tokenizer.encode_caption("a red dog"))) == "a red dog"


def test_words_group_pieces_as_decode_writes_them(tokenizer):
    text = "a snowboarder's jump, over the riverbank."
    ids = tokenizer.encode_caption(text)  # [DEC] ... [SEP]
    words = tokenizer.words(ids)
    assert [w for w, _ in words] == tokenizer.decode(ids).split()
    positions = [i for _, p in words for i in p]
    shown = [i for i, t in enumerate(ids) if tokenizer.decode([t])]  # all but special tokens ([UNK] too)
    assert positions == shown and ids[0] == tokenizer.dec_id and len(ids) - 1 not in shown
    assert any(len(p) > 1 for _, p in words)  # some word is made of several pieces


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        Tokenizer.from_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        Tokenizer.from_file(tmp_path / "bad.json")
