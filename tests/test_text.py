"""Pieces of the text transformer: the attention masks."""

import torch

from blip.config import TextConfig
from blip.text import TextTransformer


def test_self_attention_masks():
    cfg = TextConfig(vocab_size=10, width=8, depth=1, heads=2, mlp_dim=16, max_positions=16)
    decoder, encoder = TextTransformer(cfg, causal=True, cross=False), TextTransformer(cfg, causal=False, cross=False)
    assert decoder.self_attention_mask(None, 5, 0) == (None, True)  # plain causal: SDPA's fast path
    assert decoder.self_attention_mask(None, 1, 7) == (None, False)  # one new token sees all before it
    assert encoder.self_attention_mask(None, 5, 0) == (None, False)
    mask, _ = decoder.self_attention_mask(torch.tensor([[1, 1, 1, 0]]), 2, 2)  # 2 cached + 2 new, last is pad
    assert mask[0, 0].tolist() == [[True, True, True, False], [True, True, True, False]]
    mask, _ = decoder.self_attention_mask(None, 3, 1)  # causal with an offset
    assert mask[0, 0].tolist() == [[True, True, False, False], [True, True, True, False], [True, True, True, True]]
    mask, _ = encoder.self_attention_mask(torch.tensor([[1, 0, 1]]), 3, 0)
    assert mask[0, 0].tolist() == [[True, False, True]] * 3
