"""LoRA: fine-tune a few low-rank adapters instead of the whole model (Hu et al., 2021, "LoRA:
Low-Rank Adaptation of Large Language Models", section 4.1).

A frozen linear layer y = x W^T + b gets a trainable update of rank r:

    y = x W^T + b + scale * (x A^T) B^T,    A (r, in), B (out, r), scale = alpha / r

B starts at zero, so a fresh adapter changes nothing, and only A and B are trained: r * (in + out)
numbers per layer instead of in * out. After training, `merge_lora` folds scale * B A into W and
the model is a plain one again: same names, same speed. The maths and the initialisation are
peft's `LoraConfig` / `get_peft_model` (tests/test_lora.py checks loss and gradients against peft
on HF's BLIP).

Adapters alone cannot teach a word the model has never written: the word's vector in the embedding
matrix, which the LM head also scores through (tied), stays as it was. `TokenRows` trains the rows of
some tokens (those of the training captions, train.py --lora-tokens data) and nothing else of that
matrix: k x C numbers (a few hundred rows of 768 at base size: well under a megabyte), as peft's
`trainable_token_indices` with tied weights, which the tests compare against.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .speed.linear import Linear, linear
from .text import Embedding

# the last part of every adaptable layer's name (blip/vit.py, blip/text.py)
TARGETS = ("qkv", "proj", "fc1", "fc2", "query", "key", "value", "out", "dense")
# the attention projections of both towers
ATTENTION = ("qkv", "proj", "query", "key", "value", "out")
# train.py's default: the attention projections and the text decoder's MLP. On 64 pitch pictures (validation,
# the shapes model, rank 16, 4x the full fine-tune's rate) attention alone wrote 79% of the captions exactly,
# with the text MLP 85%, with every MLP 84% (the full fine-tune: 89%). The ViT's MLPs are left out: their
# inputs, kept for backward, are most of what LoRA would add to memory (base size, batch 4, fp32: peak RSS
# 3.62 GB with every MLP against 3.31 GB with attention alone; the full fine-tune: 5.65 GB)
DEFAULT = (*ATTENTION, "text.fc1", "text.fc2")
# "vision.fc1" adapts the ViT's fc1 only, "text.fc1" the text model's
SCOPES = {"vision": ("visual_encoder.",), "text": ("text_decoder.", "text_encoder.")}
# the names each tower's layers have (blip/vit.py; blip/text.py, whose MLP is the ViT's Mlp)
VISION_LAYERS = ("qkv", "proj", "fc1", "fc2")
TEXT_LAYERS = ("query", "key", "value", "out", "dense", "fc1", "fc2")


def check_target(target: str) -> str:
    """`target`, if it names layers (`TARGETS`, optionally prefixed by "vision." or "text."); else ValueError."""
    scope, _, name = target.rpartition(".")
    if name not in TARGETS or scope not in ("", *SCOPES):
        raise ValueError(f"unknown LoRA target {target!r}: choose from {', '.join(TARGETS)}, "
                         "each optionally prefixed by vision. or text. (e.g. text.query)")
    return target


def reaches_vision(target: str) -> bool:
    """Does `target` adapt layers of the ViT: "vision.<name>", or a bare name the ViT's layers have ("qkv", "fc1")?"""
    scope, _, name = target.rpartition(".")
    return scope == "vision" or (not scope and name in VISION_LAYERS)


def parse_targets(text: str) -> tuple[str, ...]:
    """A comma-separated list (the `--lora-targets` flag) -> a tuple of checked targets."""
    targets = tuple(check_target(t.strip()) for t in text.split(",") if t.strip())
    if not targets:
        raise ValueError(f"no LoRA target given: choose from {', '.join(TARGETS)}")
    return targets


@dataclass
class LoraConfig:
    rank: int = 8  # r: the adapters' inner width
    alpha: float = 16.0  # scale = alpha / rank, so a change of rank keeps the update's size
    targets: tuple[str, ...] = ("qkv", "query", "value")  # the paper adapts W_q and W_v; the ViT's are fused in qkv

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, not {self.rank}")
        self.targets = tuple(check_target(t) for t in self.targets)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]))


def targeted(name: str, targets: tuple[str, ...]) -> bool:
    """Does the module called `name` (e.g. "text_decoder.layers.0.self_attn.query") match a target?"""
    for target in targets:
        scope, _, last = target.rpartition(".")
        if name.rpartition(".")[2] == last and (not scope or name.startswith(SCOPES[scope])):
            return True
    return False


class LoRALinear(Linear):
    """A Linear plus a low-rank adapter. It holds the wrapped layer's own weight and bias Parameters,
    so their state-dict names stay `<layer>.weight` and `<layer>.bias`; the adapter adds
    `<layer>.lora_A` and `<layer>.lora_B`."""

    def __init__(self, base: Linear, rank: int, alpha: float):
        with torch.device("meta"):  # placeholders, replaced at once by the base layer's own parameters
            super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight, self.bias, self.packed = base.weight, base.bias, base.packed
        self.training = base.training
        self.scale = alpha / rank
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's (and nn.Linear's) draw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias, self.packed)  # (..., out); may take the packed CPU path
        h = F.linear(x, self.lora_A)  # (..., r)
        # y += scale * h B^T, in place: no second output-sized tensor per layer (the base layer's backward
        # needs neither), which at base size is a third of the peak memory of a LoRA step. The update is
        # computed in the dtype the base layer returned, whichever path and autocast made it
        y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]).to(y.dtype), self.lora_B.t().to(y.dtype),
                                       alpha=self.scale)
        return y

    def merged(self) -> Linear:
        """Fold the adapter into the weight (W += scale * B A); a plain Linear holding the same parameters."""
        with torch.no_grad():
            self.weight.add_((self.lora_B @ self.lora_A * self.scale).to(self.weight.dtype))  # (out, in)
        with torch.device("meta"):
            plain = Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight, plain.bias, plain.packed = self.weight, self.bias, self.packed
        plain.training = self.training
        return plain


class TokenRows(nn.Module):
    """A frozen word-embedding matrix with the rows of tokens `ids` trainable. It holds the matrix's own
    Parameter (state-dict name `<embedding>.weight`) and adds `<embedding>.rows` (k, C), those tokens' new
    vectors (initialised to the old ones, as peft does), and `<embedding>.ids` (k,). Reading a token and
    scoring it in the LM head (tied) both see the new row."""

    def __init__(self, word: nn.Embedding, ids: torch.Tensor):
        super().__init__()
        self.weight = word.weight  # (vocab, C), frozen
        self.num_embeddings, self.embedding_dim = word.num_embeddings, word.embedding_dim
        ids = torch.as_tensor(ids, dtype=torch.long, device=word.weight.device).unique()  # sorted, once each
        self.register_buffer("ids", ids)  # (k,)
        self.rows = nn.Parameter(word.weight.detach()[ids].clone())  # (k, C)
        slot = torch.full((word.num_embeddings,), -1, dtype=torch.long, device=ids.device)
        slot[ids] = torch.arange(len(ids), device=ids.device)  # token id -> its row in `rows`, or -1
        self.register_buffer("slot", slot, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.weight)  # (B, T, C)
        slot = self.slot[input_ids]  # (B, T)
        return torch.where((slot >= 0).unsqueeze(-1), self.rows[slot.clamp(min=0)].to(x.dtype), x)

    def scores(self, x: torch.Tensor, bias: torch.Tensor, packed) -> torch.Tensor:
        """(..., C) -> (..., vocab) through the matrix with the new rows: the frozen matrix's scores, with
        the k columns of the trained tokens written over in place (no second vocab-sized tensor)."""
        logits = linear(x, self.weight, bias, packed)  # (..., vocab)
        patch = F.linear(x, self.rows.to(x.dtype), bias[self.ids])  # (..., k)
        return logits.index_copy_(-1, self.ids, patch.to(logits.dtype))

    def merged(self) -> nn.Module:
        """Write the rows into the matrix; the plain embedding module, holding the same Parameter."""
        with torch.no_grad():
            self.weight.index_copy_(0, self.ids, self.rows.to(self.weight.dtype))
        with torch.device("meta"):
            plain = Embedding(self.num_embeddings, self.embedding_dim)
        plain.weight, plain.training = self.weight, self.training
        return plain


WORDS = "text_decoder.embeddings.word"  # the captioner's word-embedding matrix, tied to its LM head


def add_token_rows(model: nn.Module, ids) -> TokenRows:
    """Make the rows of tokens `ids` of the captioner's word embeddings (and so of its LM head) trainable."""
    rows = TokenRows(model.get_submodule(WORDS), ids)
    model.set_submodule(WORDS, rows)
    return rows


def adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every adapted layer (LoRALinear) and trained token rows (TokenRows) in the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (LoRALinear, TokenRows))]


def add_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Put an adapter on every Linear that `config.targets` names and freeze everything else; only
    the adapters train. Returns the adapted layers' names."""
    if adapters(model):
        raise ValueError("the model has LoRA adapters already")
    names = [n for n, m in model.named_modules() if isinstance(m, Linear) and targeted(n, config.targets)]
    if not names:
        raise ValueError(f"no linear layer matches the LoRA targets {', '.join(config.targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        model.set_submodule(name, LoRALinear(model.get_submodule(name), config.rank, config.alpha))
    return names


def merge_lora(model: nn.Module):
    """Fold every adapter into its layer's weight, and trained token rows into the embedding matrix: the
    model's state dict has the base names only again. The base weights stay frozen."""
    for name, module in adapters(model):
        model.set_submodule(name, module.merged())


ADAPTER_TENSORS = (".lora_A", ".lora_B", ".rows", ".ids")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only, by full name (`text_decoder.layers.0.self_attn.query.lora_A`, and with
    token rows `text_decoder.embeddings.word.rows` and `.ids`)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(ADAPTER_TENSORS)}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]):
    """Copy `state` into the model's adapters: every adapter present, no other name, shapes equal. Token
    rows in `state` (an adapter folder of train.py --lora-tokens data) are put on the model first."""
    if f"{WORDS}.ids" in state and not isinstance(model.get_submodule(WORDS), TokenRows):
        add_token_rows(model, state[f"{WORDS}.ids"])
    own = lora_state_dict(model)
    for problem, keys in (("missing", own.keys() - state.keys()), ("unknown", state.keys() - own.keys())):
        if keys:
            raise ValueError(f"LoRA weights do not fit the model: {len(keys)} {problem}, e.g. {min(keys)}")
    for key, value in state.items():  # all checked before any is copied
        if value.shape != own[key].shape:
            raise ValueError(f"LoRA weight {key}: shape {tuple(value.shape)}, the model's is {tuple(own[key].shape)}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
