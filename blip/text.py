"""BERT-style text transformer: BLIP's text encoder and its image-grounded caption decoder.

BLIP (Li et al., 2022, section 3.1) shares one post-LN BERT layer design between its text encoder
(bidirectional self-attention) and its decoder (causal self-attention); both may cross-attend
to the image tokens after self-attention. The decoder ends in BERT's LM head whose output
matrix is the word-embedding matrix (tied). Matches HF `BlipTextLMHeadModel` and the original
`models/med.py`; only the parameter names differ (see blip/tool/names.py for the table).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .speed import recompute
from .speed.attention import attention
from .speed.linear import Linear, PackedWeight, linear
from .vit import Mlp


class Attention(nn.Module):
    """Multi-head attention. Self-attention when keys/values come from the same tokens as the
    queries; cross-attention when they come from the image tokens (`kv_width` = image width)."""

    def __init__(self, width: int, kv_width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = dropout  # on the attention probabilities, in training
        self.query = Linear(width, width)
        self.key = Linear(kv_width, width)
        self.value = Linear(kv_width, width)
        self.out = Linear(width, width)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, heads, T, hd)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.key(source)), self.split_heads(self.value(source))

    def queries(self, x: torch.Tensor, Bk: int) -> torch.Tensor:
        """(B, T, C) -> (Bk, heads, G*T, hd) queries, B = G * Bk: the G sequences that share one set of
        keys/values (the beams of one image) folded into one longer query axis."""
        B, T, C = x.shape
        q = self.split_heads(self.query(x))  # (B, heads, T, hd)
        return q.view(Bk, B // Bk, self.heads, T, C // self.heads).transpose(1, 2).flatten(2, 3)

    def outputs(self, y: torch.Tensor, B: int) -> torch.Tensor:
        """(Bk, heads, G*T, hd) -> (B, T, C) through the output layer: the folded sequences apart again."""
        Bk, H, GT, hd = y.shape
        T = GT * Bk // B
        return self.out(y.view(Bk, H, B // Bk, T, hd).permute(0, 2, 3, 1, 4).reshape(B, T, H * hd))

    def forward(self, x, k, v, mask=None, is_causal=False, weights: list | None = None,
                transposed: bool = False) -> torch.Tensor:
        """x: (B, T, C) queries; k, v: (Bk, heads, S, hd) with B = G * Bk (transposed: k is (Bk, heads, hd, S),
        decoding's image keys: `read_image`).

        G > 1 when G sequences share one set of keys/values (the beams of one image share its
        cross-attention keys/values): their queries are folded into one longer query axis, so
        the keys/values are never copied per sequence. Masks only occur with G = 1.

        weights: when a list is given, the attention probabilities (B, heads, T, S) are appended to
        it. SDPA does not return them, so they are computed again beside it, softmax(q kᵀ / √hd) in
        fp32: the output stays SDPA's, so asking for them changes no caption.
        """
        if transposed:
            return self.read_image(x, k, v, weights)
        B, T, C = x.shape
        Bk, H, S, hd = k.shape
        q = self.queries(x, Bk)  # (Bk, heads, G*T, hd)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, is_causal, p)  # (Bk, heads, G*T, hd)
        if weights is not None:  # unmasked (cross-)attention only, as in decoding
            if mask is not None or is_causal:
                raise ValueError("attention weights are recorded for unmasked (cross-)attention only")
            probs = ((q.float() * hd**-0.5) @ k.float().transpose(-2, -1)).softmax(dim=-1)  # (Bk, heads, G*T, S)
            weights.append(probs.view(Bk, H, B // Bk, T, S).transpose(1, 2).reshape(B, H, T, S))
        return self.outputs(y, B)

    def read_image(self, x, k_t, v, weights: list | None = None) -> torch.Tensor:
        """Decoding's cross-attention, as `forward` computes it: x (B, T, C), a few new tokens per sequence;
        k_t (Bk, heads, hd, S) the image's keys, stored transposed once per image (ImageKV), v (Bk, heads,
        S, hd). Two plain matrix products and a softmax in fp32: at these shapes (a handful of query rows
        against 577 keys) the CPU's fused attention kernel takes longer than the products
        (benchmarks/profile_decoding.py). weights: as in `forward`."""
        B, T, C = x.shape
        Bk, H, hd, S = k_t.shape
        q = self.queries(x, Bk) * hd**-0.5  # (Bk, heads, G*T, hd)
        probs = torch.softmax(q @ k_t, dim=-1, dtype=torch.float32)  # (Bk, heads, G*T, S)
        if weights is not None:
            weights.append(probs.view(Bk, H, B // Bk, T, S).transpose(1, 2).reshape(B, H, T, S))
        return self.outputs(probs.to(v.dtype) @ v, B)


class TextLayer(nn.Module):
    """Post-LN: x = norm1(x + self_attn(x)); x = norm2(x + cross_attn(x, image)); x = norm3(x + mlp(x)).
    In training, dropout acts on each branch's output before it is added (BERT's hidden dropout)."""

    def __init__(self, cfg: TextConfig, cross: bool):
        super().__init__()
        self.self_attn = Attention(cfg.width, cfg.width, cfg.heads, cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        # cross-attention is where the text reads the image
        self.cross_attn = Attention(cfg.width, cfg.encoder_width, cfg.heads, cfg.dropout) if cross else None
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps) if cross else None
        self.mlp = Mlp(cfg.width, cfg.mlp_dim)
        self.norm3 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, is_causal, image_kv=None, past_kv=None, weights=None):
        """x: (B, T, C). image_kv: this layer's image keys/values. past_kv: a KVCache slot or None.
        weights: a list that receives the cross-attention probabilities (Attention.forward), or None."""
        k, v = self.self_attn.keys_values(x)  # (B, heads, T, hd)
        if past_kv is not None:
            k, v = past_kv.append(k, v)  # (B, heads, past + T, hd)
        x = self.norm1(x + self.drop(self.self_attn(x, k, v, mask, is_causal)))
        if self.cross_attn is not None and image_kv is not None:  # no image: text alone (ITC's text encoder)
            y = self.cross_attn(x, *image_kv, weights=weights, transposed=isinstance(image_kv, ImageKV))
            x = self.norm2(x + self.drop(y))
        return self.norm3(x + self.drop(self.mlp(x)))


class Embedding(nn.Embedding):
    """nn.Embedding that draws no random weights on the meta device (a model built there to load a
    checkpoint into): PyTorch's normal draw on meta tensors first imports its compiler, a second of
    start-up for nothing. Elsewhere it draws exactly as nn.Embedding does."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()

    def scores(self, x: torch.Tensor, bias: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
        """(..., C) -> (..., vocab): x against every word vector, plus `bias`: the LM head's output layer is
        this matrix (tied). (blip/lora.py TokenRows scores the same way with some rows trained.)"""
        return linear(x, self.weight, bias, packed)


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word = Embedding(cfg.vocab_size, cfg.width)
        self.position = Embedding(cfg.max_positions, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        B, T = input_ids.shape
        if start + T > self.position.num_embeddings:
            raise ValueError(f"text of {start + T} tokens is longer than the {self.position.num_embeddings} positions")
        positions = torch.arange(start, start + T, device=input_ids.device)
        return self.drop(self.norm(self.word(input_ids) + self.position(positions)))  # (B, T, C)


class LayerCache:
    """Keys/values of the tokens one self-attention layer has already seen, in buffers with room for more
    (twice as much when full): a step writes its new tokens' keys/values in place, not a copy of the past."""

    ROOM = 32  # tokens: a prompt and BLIP's 20 new ones

    def __init__(self):
        self.k = self.v = None  # (B, heads, room, hd)
        self.length = 0

    def append(self, k, v):
        """Add (B, heads, T, hd) keys/values -> all of them so far, (B, heads, past + T, hd) views."""
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            room = max(self.ROOM, 2 * end)
            grown = [t.new_empty(t.shape[0], t.shape[1], room, t.shape[3]) for t in (k, v)]
            if self.length:
                for new, old in zip(grown, (self.k, self.v), strict=True):
                    new[:, :, : self.length] = old[:, :, : self.length]
            self.k, self.v = grown
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor):
        """Keep sequences `index`: the past of each into fresh buffers of the same room."""
        kept = []
        for t in (self.k, self.v):
            new = torch.empty_like(t)
            torch.index_select(t[:, :, : self.length], 0, index, out=new[:, :, : self.length])
            kept.append(new)
        self.k, self.v = kept


class ImageKV(NamedTuple):
    """One layer's cross-attention keys and values of the images being decoded, made once per image: keys
    transposed, (B_images, heads, hd, N), values (B_images, heads, N, hd), both contiguous, as every
    decoding step reads them (Attention.read_image)."""

    k_t: torch.Tensor
    v: torch.Tensor


class KVCache:
    """What decoding keeps between steps: past self-attention keys/values per layer, and the
    image's cross-attention keys/values per layer, computed once per image (not per beam)."""

    def __init__(self, layers: list, image_kv: list, record: bool = False):
        self.layers = layers  # [LayerCache] * depth
        self.image_kv = image_kv  # [(k, v)] * depth, each (B_images, heads, N, hd)
        self.record = record  # keep the cross-attention probabilities of each step?
        self.weights = None  # with record: the last step's, [(B, heads, T, N)] * depth

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reorder(self, index: torch.Tensor):
        """Keep sequences `index` (beam search). Image keys/values are per image and stay put."""
        for layer in self.layers:
            layer.reorder(index)


class TextTransformer(nn.Module):
    """Embeddings + layers. causal=False, cross=False is BLIP's unimodal text encoder;
    causal=True, cross=True is the body of its caption decoder."""

    def __init__(self, cfg: TextConfig, causal: bool, cross: bool):
        super().__init__()
        self.cfg = cfg
        self.causal = causal
        self.embeddings = TextEmbeddings(cfg)
        self.layers = nn.ModuleList(TextLayer(cfg, cross) for _ in range(cfg.depth))
        self.recompute = "none"  # in training: what backward keeps (blip/speed/recompute.py)

    def new_cache(self, image_embeds: torch.Tensor, record: bool = False) -> KVCache:
        """An empty cache for decoding from `image_embeds` (B_images, N, C_image); with record, each
        step also keeps its cross-attention probabilities (`KVCache.weights`)."""
        # contiguous: every step reads all of them, and strided keys/values read ~1.4x slower
        image_kv = []
        for layer in self.layers:
            k, v = layer.cross_attn.keys_values(image_embeds)  # (B_images, heads, N, hd)
            image_kv.append(ImageKV(k.transpose(-2, -1).contiguous(), v.contiguous()))
        return KVCache([LayerCache() for _ in self.layers], image_kv, record)

    def self_attention_mask(self, attention_mask, T: int, past: int):
        """Returns (mask, is_causal) for SDPA. attention_mask: (B, past + T), 1 = token, 0 = pad."""
        if attention_mask is None:
            if not self.causal or T == 1:
                return None, False  # a lone new token may see everything before it
            if past == 0:
                return None, True
        L = past + T
        device = self.embeddings.word.weight.device
        keep = torch.ones(T, L, dtype=torch.bool, device=device)
        if self.causal:  # query i (absolute position past + i) sees keys 0 .. past + i
            keep = keep.tril(diagonal=past)
        keep = keep[None, None]  # (1, 1, T, L)
        if attention_mask is not None:
            keep = keep & attention_mask.bool()[:, None, None, :]  # (B, 1, T, L)
        return keep, False

    def forward(self, input_ids, attention_mask=None, image_embeds=None, cache=None) -> torch.Tensor:
        """input_ids: (B, T); image_embeds: (B_images, N, C_image) -> hidden states (B, T, C)."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        x = self.embeddings(input_ids, start=past)
        mask, is_causal = self.self_attention_mask(attention_mask, T, past)
        recording = cache is not None and cache.record
        if recording:
            cache.weights = []
        for i, layer in enumerate(self.layers):
            if cache is not None:
                image_kv, past_kv = cache.image_kv[i], cache.layers[i]
            else:
                reads_image = layer.cross_attn is not None and image_embeds is not None
                image_kv = layer.cross_attn.keys_values(image_embeds) if reads_image else None
                past_kv = None
            weights = cache.weights if recording else None
            x = recompute.run(layer, x, mask, is_causal, image_kv, past_kv, weights, mode=self.recompute)
        return x


class LMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> logits through the (tied) word-embedding matrix + a bias."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = Linear(cfg.width, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.packed = PackedWeight()  # of the word-embedding matrix, for the CPU inference path

    def forward(self, x: torch.Tensor, words: Embedding) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(x)))
        return words.scores(x, self.bias, self.packed)  # (B, T, vocab), through the word embeddings (tied)


class TextEncoder(TextTransformer):
    """BLIP's image-grounded text encoder: bidirectional self-attention, then cross-attention to the
    image tokens when they are given (image-text matching), none when not (the text features of
    image-text contrast). Its first token's state sums up the text."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg, causal=False, cross=True)
        self.apply(_init_weights)


class TextDecoder(TextTransformer):
    """The caption decoder: causal self-attention, cross-attention to the image, LM head."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg, causal=True, cross=True)
        self.head = LMHead(cfg)
        self.apply(_init_weights)

    def forward(self, input_ids, attention_mask=None, image_embeds=None, cache=None) -> torch.Tensor:
        """-> next-token logits (B, T, vocab): position t predicts token t + 1."""
        if image_embeds is None and cache is None:
            raise ValueError("the caption decoder reads an image: pass image_embeds or a cache made from them")
        x = super().forward(input_ids, attention_mask, image_embeds, cache)
        return self.head(x, self.embeddings.word)


def _init_weights(module: nn.Module):
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms. Nothing on the
    meta device (a model built there to load a checkpoint into: nothing to draw; see Embedding)."""
    if any(p.is_meta for p in module.parameters(recurse=False)):
        return
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
