"""BLIP's tokenizer: bert-base-uncased WordPiece (via `tokenizers`) plus two added tokens.

[DEC] (id = base vocab size, 30522 for bert-base-uncased) starts every caption the decoder reads
or writes, in place of BERT's [CLS]; [ENC] (30523) marks image-grounded text encoding. The hub
tokenizer files of Salesforce/blip-* lack both; they are added here when missing, as the original
BLIP code does. Token ids equal `BertTokenizerFast` with the same two special tokens added.
"""

import json
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer as _Tokenizer
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BLIP_SPECIAL = ["[DEC]", "[ENC]"]


class Tokenizer:
    def __init__(self, tok: _Tokenizer):
        missing = [t for t in BLIP_SPECIAL if tok.token_to_id(t) is None]
        tok.add_special_tokens(missing)  # appended in order: [DEC] then [ENC]
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        ids = {t: tok.token_to_id(t) for t in BERT_SPECIAL[:4] + BLIP_SPECIAL}
        absent = [t for t, i in ids.items() if i is None]
        if absent:
            raise ValueError(f"tokenizer has no {', '.join(absent)} token")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = (ids[t] for t in BERT_SPECIAL[:4])
        self.dec_id, self.enc_id = ids["[DEC]"], ids["[ENC]"]

    # --- building -------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """A tokenizer.json, a vocab.txt, or a folder holding either (tokenizer.json preferred)."""
        path = Path(path)
        if path.is_dir():
            found = [path / n for n in ("tokenizer.json", "vocab.txt") if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {path}")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if path.suffix == ".json":
            try:
                return cls(_Tokenizer.from_file(str(path)))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON
                raise ValueError(f"cannot read tokenizer {path}: {e}") from None
        return cls(bert_wordpiece(WordPiece.from_file(str(path), unk_token="[UNK]")))

    @classmethod
    def train(cls, texts, vocab_size: int = 1000) -> "Tokenizer":
        """A lower-cased WordPiece vocabulary for `texts` (models trained from scratch, tests): BERT's
        special tokens, every character seen (alone and as a "##" continuation, so any word can be
        spelled), then the most frequent words (ties in alphabetical order), `vocab_size` in all.
        Built here rather than with `tokenizers`' WordPieceTrainer, which breaks ties in hash-map
        order and so can give another vocabulary on every run (tokenizers issue #1794): the same
        captions must give the same tokenizer, or the same seed would not give the same model."""
        tok = bert_wordpiece(WordPiece(unk_token="[UNK]"))  # BERT's normaliser and pre-tokeniser
        counts = Counter()
        for text in texts:
            counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
        chars = sorted({c for word in counts for c in word})
        vocab = BERT_SPECIAL + chars + ["##" + c for c in chars]
        words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
        vocab += words[: max(0, vocab_size - len(vocab))]
        return cls(bert_wordpiece(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")))

    @classmethod
    def from_str(cls, text: str) -> "Tokenizer":
        """A tokenizer from the contents of a tokenizer.json."""
        return cls(_Tokenizer.from_str(text))

    def to_str(self) -> str:
        """The contents of its tokenizer.json."""
        return self._tok.to_str()

    def save(self, path):
        self._tok.save(str(path))

    def save_vocab(self, path):
        """Write vocab.txt (one token per line, in id order, added tokens included)."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        Path(path).write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # --- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """BERT's encoding: [CLS] tokens [SEP]."""
        return self._tok.encode(text).ids

    def tokens(self, text: str) -> list[int]:
        """Word-piece ids of `text`, no special tokens around them."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_caption(self, text: str, max_length: int | None = None) -> list[int]:
        """The decoder's encoding: [DEC] tokens [SEP], truncated to `max_length` ids in all."""
        ids = self.tokens(text)
        if max_length is not None:
            ids = ids[: max(max_length - 2, 0)]
        return [self.dec_id, *ids, self.sep_id]

    def encode_prompt(self, prompt: str) -> list[int]:
        """Where generation starts: [DEC] followed by the prompt's tokens (no [SEP])."""
        return [self.dec_id, *self.tokens(prompt)]

    def batch(self, texts: list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (input_ids, attention_mask), both (B, T) int64, right-padded with [PAD]."""
        seqs = [self.encode_caption(t, max_length) for t in texts]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids, mask

    def decode(self, ids) -> str:
        """Ids -> text, special tokens dropped, word pieces joined."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(ids, skip_special_tokens=True)

    def pieces(self, ids) -> str:
        """Ids as their word pieces, special tokens included: "[DEC] a picture of"."""
        return " ".join(self._tok.id_to_token(i) for i in ids)

    def words(self, ids) -> list[tuple[str, list[int]]]:
        """The words of a caption as `decode` writes them, each with the positions of its tokens:
        word pieces and the punctuation decoding attaches ("beach ," -> "beach,") join their word;
        special tokens belong to none. [a, ##bc, ",", d] -> [("abc,", [0, 1, 2]), ("d", [3])]."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        positions = []
        for i, token_id in enumerate(ids):
            if not self.decode([token_id]):
                continue  # a special token
            if len(self.decode(ids[: i + 1]).split()) > len(positions):
                positions.append([i])
            elif positions:
                positions[-1].append(i)
        return list(zip(self.decode(ids).split(), positions, strict=True))

    def to_hf_config(self) -> dict:
        """tokenizer_config.json contents that let HF's BertTokenizerFast load tokenizer.json."""
        return {
            "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512,
            "bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"],
            "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
            "mask_token": "[MASK]",
        }


def bert_wordpiece(model: WordPiece) -> _Tokenizer:
    """bert-base-uncased's pipeline around a WordPiece model: clean, lower-case, split, word pieces."""
    tok = _Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    vocab = tok.get_vocab()
    tok.add_special_tokens([t for t in BERT_SPECIAL if t in vocab])  # matched whole, skipped when decoding
    if "[CLS]" in vocab and "[SEP]" in vocab:
        tok.post_processor = bert_template(tok)
    return tok


def bert_template(tok: _Tokenizer):
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    return processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )


def write_hf_files(tokenizer: Tokenizer, folder: Path):
    """tokenizer.json + tokenizer_config.json, loadable by HF's AutoTokenizer / BlipProcessor."""
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer.to_hf_config(), indent=2))
