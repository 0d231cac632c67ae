"""The image encoder: a pre-LN Vision Transformer (Dosovitskiy et al., 2021), as BLIP uses it.

BLIP (Li et al., 2022, section 3.1) encodes an image into a sequence of patch tokens plus a class
token; the caption decoder cross-attends to all of them. The parameter names are timm's
(`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.i.attn.qkv`, ...), which are also the names
in the original BLIP checkpoints, so timm's `VisionTransformer` can load these weights unchanged.
Matches HF `BlipVisionModel(...).last_hidden_state` and timm's `forward_features`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .speed import recompute
from .speed.attention import attention
from .speed.linear import Linear


class PatchEmbed(nn.Module):
    """Cut the image into patches and project each to a token: one strided convolution."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, grid, grid)
        return x.flatten(2).transpose(1, 2)  # (B, grid*grid, C)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with one fused qkv projection."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = Linear(cfg.width, 3 * cfg.width)
        self.proj = Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, hd)
        x = attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, hd)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """fc1, GELU, fc2: the MLP of every ViT block and of every text layer (BERT's intermediate and
    output dense layers are the same two products and GELU; blip/text.py uses this one)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as in BLIP and HF


class Block(nn.Module):
    """Pre-LN: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.recompute = "none"  # in training: what backward keeps and what it recomputes (blip/speed/recompute.py)
        with torch.no_grad():  # positions the model can read from the first step (learned from there on)
            self.pos_embed[0, 1:] = sincos_2d(cfg.grid, cfg.width)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1 + grid*grid, C) image tokens after the final norm."""
        B, _, H, W = pixel_values.shape
        size = self.cfg.image_size
        if H != size or W != size:
            raise ValueError(f"expected {size}x{size} images, got {H}x{W}")
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype))  # (B, N-1, C)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, N, C)
        x = x + self.pos_embed
        for block in self.blocks:
            x = recompute.run(block, x, mode=self.recompute)
        return self.norm(x)


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(grid*grid, width) 2-D sine-cosine position codes (MAE, He et al. 2022): half of the
    channels encode the row, half the column, each as sines and cosines of several frequencies."""
    quarter = width // 4
    # on the CPU whatever device the model is built on: on the meta device (checkpoint loading) these
    # float64 ops would first import PyTorch's compiler, a second of start-up
    f64 = dict(dtype=torch.float64, device="cpu")
    freq = 1.0 / 10000 ** (torch.arange(quarter, **f64) / quarter)  # (width/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, **f64), torch.arange(grid, **f64), indexing="ij")
    angles = [pos.reshape(-1, 1) * freq for pos in (rows, cols)]  # 2 x (grid*grid, width/4)
    codes = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # (grid*grid, 4*quarter)
    return nn.functional.pad(codes, (0, width - 4 * quarter)).float()


def _init_weights(module: nn.Module):
    """timm's ViT initialisation: truncated normal(0, 0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
