"""The image encoder against timm's VisionTransformer and HF's BlipVisionModel, same weights."""

from functools import partial

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from blip.config import VisionConfig
from blip.vit import VisionTransformer
from conftest import randomize


@pytest.mark.parametrize("cfg", [
    VisionConfig(image_size=64, patch_size=16, width=64, depth=2, heads=4, mlp_dim=256, ln_eps=1e-6),
    VisionConfig(image_size=96, patch_size=8, width=96, depth=3, heads=3, mlp_dim=192, ln_eps=1e-5),
])
def test_matches_timm(cfg):
    ours = randomize(VisionTransformer(cfg).eval())
    timm = TimmViT(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
        num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.width, qkv_bias=True, num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=cfg.ln_eps),
    ).eval()
    timm.load_state_dict(ours.state_dict(), strict=True)  # same names, nothing missing or left over
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        a, b = ours(x), timm.forward_features(x)
    assert a.shape == (2, cfg.num_tokens, cfg.width)
    assert (a - b).abs().max() <= 1e-5


def test_matches_hf_vision_model(hf_tiny, ours_tiny):
    from blip import BlipCaptioner

    hf, _ = hf_tiny
    ours = BlipCaptioner.from_pretrained(ours_tiny)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        a = ours.encode_image(x)
        b = hf.vision_model(pixel_values=x).last_hidden_state
    assert (a - b).abs().max() <= 1e-5


def test_wrong_image_size_is_a_clear_error():
    vit = VisionTransformer(VisionConfig(image_size=64, width=64, depth=1, heads=4, mlp_dim=128))
    with pytest.raises(ValueError, match="expected 64x64 images, got 32x48"):
        vit(torch.randn(1, 3, 32, 48))
