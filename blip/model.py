"""BlipCaptioner: BLIP's image-grounded text decoder (Li et al., 2022, section 3.1 and 3.2).

    image (B, 3, H, W) --ViT--> image tokens (B, N, C_img)
    [DEC] caption [SEP] (B, T) --decoder: causal self-attn, cross-attn to image tokens--> logits (B, T, vocab)

Logits are aligned like HF `BlipForConditionalGeneration(...).logits`: position t scores token t + 1.
The loss follows the original BLIP (models/blip.py, BLIP_Decoder.forward), not HF's `forward`:
the first token is [DEC], pads and prompt tokens are not targets, labels are smoothed by 0.1.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_model, save_model
from .config import BlipConfig
from .speed import recompute
from .text import KVCache, TextDecoder, TextEncoder
from .vit import VisionTransformer

IGNORE = -100  # label of a position the loss skips (pads, prompt)
# images the ViT encodes at once in inference on the CPU: its largest activations (the MLP's, 28 MB at 4 images)
# then fit in the blocks the decoding of the last batch freed, so a run of caption.py holds less memory (64 photos
# in batches of 16: peak RSS 2.50-2.66 GB against 2.74-2.92 GB, wall time within 1%, the same captions)
VIT_CHUNK = 4


class Pretrained(nn.Module):
    """Our checkpoint folder (blip/checkpoint.py) for both model classes: config.json says which."""

    @classmethod
    def from_pretrained(cls, folder, map_location="cpu", config: BlipConfig | None = None, dtype=None):
        """The folder's model; `config` (default: the folder's) may change what weights do not fix;
        `dtype` (default fp32) is its weights' dtype."""
        return load_model(folder, cls, map_location, config, dtype)

    def save_pretrained(self, folder, tokenizer=None):
        """Write config.json and model.safetensors (and tokenizer.json when given) to `folder`."""
        save_model(self, folder, tokenizer)


class BlipCaptioner(Pretrained):
    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_decoder = TextDecoder(config.text)

    def set_recompute(self, mode: str):
        """What training keeps for backward, in the ViT and the decoder alike: "none", "elementwise"
        (recompute norms, GELU and adds from kept products) or "full" (blip/speed/recompute.py)."""
        if mode not in recompute.MODES:
            raise ValueError(f"recompute mode must be one of {recompute.MODES}, not {mode!r}")
        self.visual_encoder.recompute = self.text_decoder.recompute = mode

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, C_img) image tokens; in inference on the CPU, VIT_CHUNK images at a time."""
        if torch.is_grad_enabled() or pixel_values.device.type != "cpu" or len(pixel_values) <= VIT_CHUNK:
            return self.visual_encoder(pixel_values)
        return torch.cat([self.visual_encoder(chunk) for chunk in pixel_values.split(VIT_CHUNK)])

    def forward(self, pixel_values, input_ids, attention_mask=None, image_embeds=None) -> torch.Tensor:
        """pixel_values (B, 3, H, W), input_ids (B, T), attention_mask (B, T) -> logits (B, T, vocab).
        image_embeds: the images' tokens (B, N, C_img) when already encoded (train.py's cache of image
        tokens); pixel_values is then None."""
        if image_embeds is None:
            image_embeds = self.encode_image(pixel_values)
        return self.text_decoder(input_ids, attention_mask, image_embeds)

    def new_cache(self, image_embeds: torch.Tensor, record: bool = False) -> KVCache:
        """A decoding cache holding each layer's cross-attention keys/values for these images (and,
        with record, each step's cross-attention probabilities)."""
        return self.text_decoder.new_cache(image_embeds, record)

    def loss(self, pixel_values, input_ids, attention_mask=None, prompt_length: int = 0) -> torch.Tensor:
        """BLIP's captioning loss for a batch of `[DEC] prompt caption [SEP] [PAD]...` sequences."""
        labels = caption_labels(input_ids, attention_mask, prompt_length, self.config.text.bos_token_id)
        logits = self(pixel_values, input_ids, attention_mask)
        return caption_loss(logits, labels, self.config.label_smoothing)


class BlipRetrieval(Pretrained):
    """BLIP's image-text matching (ITM) and image-text contrast (ITC), section 3.1: the ViT, the
    image-grounded text encoder, ITC's projections and the ITM head. Matches HF
    `BlipForImageTextRetrieval` (use_itm_head=True: `itm`, False: `itc`)."""

    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = TextEncoder(config.text)
        self.vision_proj = nn.Linear(config.vision.width, config.embed_dim)
        self.text_proj = nn.Linear(config.text.width, config.embed_dim)
        self.itm_head = nn.Linear(config.text.width, 2)  # logits of (no match, match)

    def itm(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B,) probability that text b describes image b: the ITM head on the first token of the
        text encoder reading the image (pixel_values (B, 3, H, W), input_ids (B, T))."""
        return self.match(self.visual_encoder(pixel_values), input_ids, attention_mask)

    def match(self, image_embeds, input_ids, attention_mask=None) -> torch.Tensor:
        """`itm` from image tokens (B or 1, N, C_img): one encoded image is read by all B texts."""
        image_embeds = image_embeds.expand(input_ids.shape[0], -1, -1)  # (B, N, C_img), a view
        text = self.text_encoder(input_ids, attention_mask, image_embeds)  # (B, T, C)
        return self.itm_head(text[:, 0]).softmax(dim=-1)[:, 1]

    def itc(self, pixel_values, input_ids, attention_mask=None) -> torch.Tensor:
        """(B_images, B_texts) cosine similarity of every image with every text: the projected first
        tokens of the ViT and of the text encoder, each alone (no cross-attention)."""
        image = F.normalize(self.vision_proj(self.visual_encoder(pixel_values)[:, 0]), dim=-1)  # (B_img, D)
        text = F.normalize(self.text_proj(self.text_encoder(input_ids, attention_mask)[:, 0]), dim=-1)  # (B_txt, D)
        return image @ text.t()


def caption_labels(input_ids, attention_mask, prompt_length: int, bos_token_id: int) -> torch.Tensor:
    """Targets for `caption_loss`: the input ids with [DEC], the prompt and pads set to IGNORE."""
    if not (input_ids[:, 0] == bos_token_id).all():
        raise ValueError(
            f"every caption must start with [DEC] (id {bos_token_id}), not [CLS]: "
            "encode captions with Tokenizer.encode_caption / Tokenizer.batch"
        )
    labels = input_ids.clone()
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE)
    labels[:, : 1 + prompt_length] = IGNORE
    return labels


def caption_loss(logits, labels, label_smoothing: float = 0.1, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over caption tokens (logits[:, t] predicts labels[:, t + 1]): their
    mean, or with reduction="sum" their sum (train.py divides by the tokens of the whole batch)."""
    V = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE, label_smoothing=label_smoothing, reduction=reduction,
    )
