"""Model configuration: plain dataclasses, saved as JSON in our checkpoint folder.

Presets:
  base   ViT-B/16 at 384 px + 12-layer BERT-base decoder (Salesforce/blip-image-captioning-base)
  large  ViT-L/16 at 384 px + the same decoder, cross-attending to 1024-wide image tokens
  tiny   a few layers of width 128, for tests and the demo (trains in minutes on 2 CPU cores)
  small  tiny's layers at twice the width (256): how settings scale with width is measured on both
"""

from dataclasses import asdict, dataclass, field, fields, replace


@dataclass
class VisionConfig:
    image_size: int = 384  # square input side in pixels; positions = (image_size / patch_size)^2 + 1
    patch_size: int = 16  # side of one patch, also the stride of the patch convolution
    width: int = 768  # token width inside the ViT
    depth: int = 12  # number of pre-LN transformer blocks
    heads: int = 12  # attention heads per block
    mlp_dim: int = 3072  # hidden width of the block MLP
    ln_eps: float = 1e-5  # HF checkpoints say 1e-5, the original BLIP ViT used 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + 1  # patches + class token


@dataclass
class TextConfig:
    vocab_size: int = 30524  # bert-base-uncased (30522) + [DEC] + [ENC]
    width: int = 768  # token width of the BERT layers
    depth: int = 12  # number of post-LN layers
    heads: int = 12  # attention heads, for self- and cross-attention alike
    mlp_dim: int = 3072  # hidden width of the layer MLP
    max_positions: int = 512  # learned absolute positions
    ln_eps: float = 1e-12  # BERT's LayerNorm eps
    encoder_width: int = 768  # width of the image tokens the cross-attention reads (= vision width)
    pad_token_id: int = 0  # [PAD]
    bos_token_id: int = 30522  # [DEC]: the first token of every caption
    sep_token_id: int = 102  # [SEP]: ends a caption
    dropout: float = 0.0  # training only: BERT's hidden and attention dropout (HF's configs: 0, original BLIP: 0.1)


@dataclass
class GenerationConfig:
    """How a checkpoint's captions are decoded unless the caller says otherwise (caption.py, Captioner,
    train.py's evaluation), as HF's generation_config.json. BLIP's values; train.py sets the lengths
    from its training captions, so that a model taught long captions is not cut at 20 tokens."""

    num_beams: int = 3  # beam search width (1: greedy)
    max_new_tokens: int = 20  # new tokens at most, the closing [SEP] counted
    min_new_tokens: int = 5  # [SEP] is not allowed before this many new tokens


@dataclass
class BlipConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    embed_dim: int = 256  # BlipRetrieval: width of the image and text features ITC compares
    label_smoothing: float = 0.1  # BLIP's captioning loss smooths labels by 0.1
    prompt: str = "a picture of "  # BLIP prepends this to captions; its tokens are not trained on

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BlipConfig":
        d = dict(d)
        for name, sub in (("vision", VisionConfig), ("text", TextConfig), ("generation", GenerationConfig)):
            d[name] = _build(sub, d.get(name, {}), name)
        return _build(cls, d, "config")


def _build(cls, d: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown field(s) in {where}: {', '.join(unknown)}")
    return cls(**d)


def base() -> BlipConfig:
    return BlipConfig()


def large() -> BlipConfig:
    return BlipConfig(
        vision=VisionConfig(width=1024, depth=24, heads=16, mlp_dim=4096),
        text=TextConfig(encoder_width=1024),
    )


def tiny(vocab_size: int = 1024, bos_token_id: int = 1022, sep_token_id: int = 3) -> BlipConfig:
    """Small enough to train from scratch in minutes on 2 CPU cores (the demo); vocab comes from the
    tokenizer it is paired with. 64 px in 8 px patches: an 8 x 8 grid the decoder can read places on."""
    return BlipConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=128, depth=4, heads=4, mlp_dim=512),
        text=TextConfig(
            vocab_size=vocab_size, width=128, depth=2, heads=4, mlp_dim=512, max_positions=64,
            encoder_width=128, bos_token_id=bos_token_id, sep_token_id=sep_token_id,
        ),
    )


def small(vocab_size: int = 1024, bos_token_id: int = 1022, sep_token_id: int = 3) -> BlipConfig:
    """tiny at twice the width, heads of the same 32 channels: a second size to measure how a learning
    rate scales with width (benchmarks/lr_scaling.py)."""
    config = tiny(vocab_size, bos_token_id, sep_token_id)
    return BlipConfig(vision=replace(config.vision, width=256, heads=8, mlp_dim=1024),
                      text=replace(config.text, width=256, heads=8, mlp_dim=1024, encoder_width=256))


PRESETS = {"base": base, "large": large, "tiny": tiny, "small": small}


def with_tokenizer(config: BlipConfig, tokenizer) -> BlipConfig:
    """Return `config` with vocab size and special ids taken from `tokenizer`."""
    text = replace(
        config.text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_id,
        bos_token_id=tokenizer.dec_id, sep_token_id=tokenizer.sep_id,
    )
    return replace(config, text=text)
