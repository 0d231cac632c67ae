"""BLIP image captioning in plain PyTorch."""

from .config import BlipConfig, TextConfig, VisionConfig
from .model import BlipCaptioner, BlipRetrieval
from .tokenizer import Tokenizer

__all__ = ["BlipCaptioner", "BlipRetrieval", "BlipConfig", "TextConfig", "Tokenizer", "VisionConfig"]
