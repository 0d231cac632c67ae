"""Every weight's name in the three checkpoint layouts: HF snapshots, original Salesforce BLIP `.pth`
files and ours, for both model kinds (captioner, retrieval), and `rename` between any two of them. One
table holds every name; every source key is either renamed by it or listed in a layout's ignored names,
and anything else is an error. blip/tool/convert.py converts whole checkpoints with it.
"""

import re
from dataclasses import dataclass

import torch

from ..checkpoint import CheckpointError
from ..model import BlipCaptioner, BlipRetrieval

# HF name | original BLIP name (None: same as HF) | our name.
# {i} is a layer index, {p} is "weight" or "bias". Our ViT uses timm's names, which are the
# original checkpoint's; the original text decoder uses the names HF kept.
V, VL = "vision_model.", "vision_model.encoder.layers.{i}."
E, EB = "visual_encoder.", "visual_encoder.blocks.{i}."
T, TL = "text_decoder.bert.", "text_decoder.bert.encoder.layer.{i}."
D, DL = "text_decoder.", "text_decoder.layers.{i}."
TABLE = [
    (V + "embeddings.class_embedding", E + "cls_token", E + "cls_token"),
    (V + "embeddings.position_embedding", E + "pos_embed", E + "pos_embed"),
    (V + "embeddings.patch_embedding.{p}", E + "patch_embed.proj.{p}", E + "patch_embed.proj.{p}"),
    (VL + "layer_norm1.{p}", EB + "norm1.{p}", EB + "norm1.{p}"),
    (VL + "self_attn.qkv.{p}", EB + "attn.qkv.{p}", EB + "attn.qkv.{p}"),
    (VL + "self_attn.projection.{p}", EB + "attn.proj.{p}", EB + "attn.proj.{p}"),
    (VL + "layer_norm2.{p}", EB + "norm2.{p}", EB + "norm2.{p}"),
    (VL + "mlp.fc1.{p}", EB + "mlp.fc1.{p}", EB + "mlp.fc1.{p}"),
    (VL + "mlp.fc2.{p}", EB + "mlp.fc2.{p}", EB + "mlp.fc2.{p}"),
    (V + "post_layernorm.{p}", E + "norm.{p}", E + "norm.{p}"),
    (T + "embeddings.word_embeddings.weight", None, D + "embeddings.word.weight"),
    (T + "embeddings.position_embeddings.weight", None, D + "embeddings.position.weight"),
    (T + "embeddings.LayerNorm.{p}", None, D + "embeddings.norm.{p}"),
    (TL + "attention.self.query.{p}", None, DL + "self_attn.query.{p}"),
    (TL + "attention.self.key.{p}", None, DL + "self_attn.key.{p}"),
    (TL + "attention.self.value.{p}", None, DL + "self_attn.value.{p}"),
    (TL + "attention.output.dense.{p}", None, DL + "self_attn.out.{p}"),
    (TL + "attention.output.LayerNorm.{p}", None, DL + "norm1.{p}"),
    (TL + "crossattention.self.query.{p}", None, DL + "cross_attn.query.{p}"),
    (TL + "crossattention.self.key.{p}", None, DL + "cross_attn.key.{p}"),
    (TL + "crossattention.self.value.{p}", None, DL + "cross_attn.value.{p}"),
    (TL + "crossattention.output.dense.{p}", None, DL + "cross_attn.out.{p}"),
    (TL + "crossattention.output.LayerNorm.{p}", None, DL + "norm2.{p}"),
    (TL + "intermediate.dense.{p}", None, DL + "mlp.fc1.{p}"),
    (TL + "output.dense.{p}", None, DL + "mlp.fc2.{p}"),
    (TL + "output.LayerNorm.{p}", None, DL + "norm3.{p}"),
    ("text_decoder.cls.predictions.transform.dense.{p}", None, D + "head.dense.{p}"),
    ("text_decoder.cls.predictions.transform.LayerNorm.{p}", None, D + "head.norm.{p}"),
    ("text_decoder.cls.predictions.bias", None, D + "head.bias"),
]
# the LM head's output layer is tied to the word embeddings; files may or may not store it
TIED = {
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}
# present in some files, not used by a captioner (regular expressions, matched whole)
IGNORED = [
    r"text_decoder\.bert\.embeddings\.position_ids",  # a buffer older transformers saved
    # the rest of an original BLIP pretraining checkpoint: ITC/ITM text encoder, momentum
    # encoders, projections, queues and temperature
    r"(text_encoder|text_encoder_m|visual_encoder_m|text_decoder_m)\..*",
    r"(vision_proj|text_proj|vision_proj_m|text_proj_m|itm_head)\.(weight|bias)",
    r"temp|image_queue|text_queue|idx_queue|ptr_queue|queue_ptr",
]
HF, ORIGINAL, OURS = 0, 1, 2


@dataclass(frozen=True)
class Layout:
    """One model kind: every weight name (the renaming table, tied pairs, names to skip), our model
    class, HF's class name, and the text model's prefix in HF and original files."""

    table: list
    tied: dict
    ignored: list
    model_class: type
    hf_class: str
    text_prefix: str


def _as_encoder(name: str | None) -> str | None:
    """A text-decoder name in TABLE -> the text encoder's (same BERT layers, under text_encoder.)."""
    return name and name.replace("text_decoder.bert.", "text_encoder.").replace("text_decoder.", "text_encoder.")


CAPTIONER = Layout(TABLE, TIED, IGNORED, BlipCaptioner, "BlipForConditionalGeneration", T)
# BlipRetrieval: the ViT, the text encoder (the decoder's rows, renamed; no LM head), ITC/ITM heads;
# HF BlipForImageTextRetrieval and the original models/blip_retrieval.py name them alike
RETRIEVAL = Layout(
    table=[tuple(_as_encoder(n) for n in row) for row in TABLE if ".cls." not in row[HF]]
    + [(f"{name}.{{p}}", None, f"{name}.{{p}}") for name in ("vision_proj", "text_proj", "itm_head")],
    tied={},
    ignored=[
        r"text_encoder\.embeddings\.position_ids",  # a buffer older transformers saved
        # the rest of an original retrieval checkpoint: momentum encoders and projections, queues, temperature
        r"(visual_encoder_m|text_encoder_m)\..*",
        r"(vision_proj_m|text_proj_m)\.(weight|bias)",
        r"temp|image_queue|text_queue|idx_queue|ptr_queue",
    ],
    model_class=BlipRetrieval,
    hf_class="BlipForImageTextRetrieval",
    text_prefix="text_encoder.",
)


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(rx)


KINDS = {"BlipCaptioner": CAPTIONER, "BlipRetrieval": RETRIEVAL}  # our model class name -> its layout


def rename(state: dict, src: int, dst: int, source: str, layout: Layout = CAPTIONER) -> dict:
    """Rename every key of `state` from column `src` of the layout's table to column `dst`."""
    rows = [(row[src] or row[HF], row[dst] or row[HF]) for row in layout.table]
    rules = [(_pattern(a), b) for a, b in rows]
    tied = layout.tied if src != OURS else {}
    ignored = [re.compile(p) for p in layout.ignored] if src != OURS else []
    out = {}
    for key, value in state.items():
        if key in tied:
            continue  # checked against its source in check_tied
        if any(p.fullmatch(key) for p in ignored):
            continue
        for rx, target in rules:
            m = rx.fullmatch(key)
            if m:
                out[target.format(**m.groupdict())] = value
                break
        else:
            raise CheckpointError(f"{source}: unknown weight {key}")
    if src != OURS:
        check_tied(state, source, layout.tied)
    return out


def check_tied(state: dict, source: str, tied: dict):
    for key, twin in tied.items():
        if key in state and twin in state and not torch.equal(state[key], state[twin]):
            raise CheckpointError(f"{source}: {key} differs from {twin}, but BLIP ties them")
