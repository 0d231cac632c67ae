"""BLIP image captioning in plain PyTorch."""

from .config import BlipConfig, TextConfig, VisionConfig
from .model import BlipCaptioner
from .tokenizer import Tokenizer

__all__ = ["BlipCaptioner", "BlipConfig", "TextConfig", "Tokenizer", "VisionConfig"]
