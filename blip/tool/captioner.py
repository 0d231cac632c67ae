"""The Python API for captioning: a model, its tokenizer and its image size, on one device.

    from blip.tool.captioner import Captioner
    captioner = Captioner.from_pretrained("checkpoints/blip-base")
    captioner.caption(["dog.jpg", "cat.png"])   # -> ["a dog on the beach", ...]

Captions are decoded as the checkpoint's config says (its prompt and `generation`: beams, lengths)
unless the call says otherwise: `captioner.caption(images, num_beams=1, max_new_tokens=40)`.
"""

from dataclasses import asdict

import torch

from ..checkpoint import load_tokenizer
from ..decoding import DecodeConfig, changed, generate_from
from ..image import load_image, preprocess
from ..model import BlipCaptioner, BlipRetrieval
from .attention_map import word_maps

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX), where bf16 matmuls run
    at about twice the fp32 rate; elsewhere PyTorch emulates them, slowly."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: fp32 on CPU (bf16 is slow without AVX-512), bf16 on GPUs that have it, else fp16."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DTYPES[name]


class OnDevice:
    """A model and its tokenizer, on one device in one dtype, ready for inference."""

    model_class = None  # what from_pretrained loads

    def __init__(self, model, tokenizer, device="cpu", dtype=torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def from_pretrained(cls, folder, device: str = "auto", dtype: str = "auto"):
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        # on the CPU, loaded in that dtype: the file's fp32 pages are never all held beside it
        model = cls.model_class.from_pretrained(folder, dtype=dtype if device.type == "cpu" else None)
        return cls(model, load_tokenizer(folder), device, dtype)

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size

    def pixels(self, images) -> torch.Tensor:
        """PIL images or image paths (or their (B, 3, size, size) pixels, as `preprocess` makes them) ->
        model input on this device, in this dtype."""
        if not torch.is_tensor(images):
            images = preprocess([im if hasattr(im, "mode") else load_image(im) for im in images], self.image_size)
        return images.to(self.device, self.dtype)


class Captioner(OnDevice):
    model_class = BlipCaptioner

    @property
    def defaults(self) -> DecodeConfig:
        """The checkpoint's own decoding settings (config.json's "generation")."""
        return DecodeConfig(**asdict(self.model.config.generation))

    @property
    def prompt(self) -> str:
        """The text the checkpoint's captions continue (config.json's "prompt")."""
        return self.model.config.prompt

    def generator(self, seed: int | None) -> torch.Generator | None:
        """A seeded random stream for sampling on this device (None: torch's global one)."""
        return None if seed is None else torch.Generator(self.device).manual_seed(seed)

    @torch.inference_mode()
    def encode(self, images) -> torch.Tensor:
        """(B, N, C) image tokens of PIL images or image paths, what the decoder reads. `caption` and
        `samples` take them in place of the images, so that several decodings share one encoding."""
        return self.model.encode_image(self.pixels(images))

    def caption(self, images, prompt: str | None = None, config: DecodeConfig | None = None,
                generator: torch.Generator | None = None, seed: int | None = None,
                attention: list | None = None, **options) -> list[str]:
        """Caption PIL images or image paths (one batch), or their tokens from `encode`; `config`
        (default: the checkpoint's, `defaults`) with `options`, DecodeConfig fields, changed in it.
        The prompt (default: the checkpoint's) conditions the caption but is not part of the
        returned text. sample=True draws one sequence (num_beams 1 unless given). For sampling,
        pass a seed, or a generator to continue one random stream over several calls.
        attention: when a list is given, it receives per image (words, maps): where the decoder
        looked for each word, (words, grid, grid) over the image patches (blip/tool/attention_map.py)."""
        config = changed(config or self.defaults, **options)
        prompt = self.prompt if prompt is None else prompt
        if generator is None:
            generator = self.generator(seed)
        tokens = images if torch.is_tensor(images) else self.encode(images)
        maps = [] if attention is not None else None
        ids = generate_from(self.model, tokens, self.tokenizer.encode_prompt(prompt), config, generator, maps)
        if attention is not None:
            grid = self.model.config.vision.grid
            attention.extend(word_maps(self.tokenizer, i, m.cpu(), grid) for i, m in zip(ids, maps, strict=True))
        return [self.tokenizer.decode(i) for i in ids]

    @torch.inference_mode()
    def samples(self, image, n: int, prompt: str | None = None, config: DecodeConfig | None = None,
                generator: torch.Generator | None = None) -> list[str]:
        """n captions of one image (PIL image or path, or its (1, N, C) tokens from `encode`) drawn by
        `config` (default: nucleus sampling), the image encoded once for all of them."""
        tokens = image if torch.is_tensor(image) else self.encode([image])
        tokens = tokens.expand(n, -1, -1)  # (n, N, C), a view of one encoding
        config = config or changed(self.defaults, sample=True)
        prompt = self.prompt if prompt is None else prompt
        ids = generate_from(self.model, tokens, self.tokenizer.encode_prompt(prompt), config, generator)
        return [self.tokenizer.decode(i) for i in ids]


MATCH_TOKENS = 35  # texts are cut to this many tokens for matching, as BLIP's retrieval models were trained


class Matcher(OnDevice):
    """How well texts fit an image: BLIP's image-text matching head (a BlipRetrieval folder).

    matcher = Matcher.from_pretrained("checkpoints/blip-itm-base")
    matcher.scores(image, ["a dog on a beach", "a cat"])   # -> tensor of match probabilities
    """

    model_class = BlipRetrieval

    @torch.inference_mode()
    def scores(self, image, texts: list[str]) -> torch.Tensor:
        """(len(texts),) probability that each text describes the image (PIL image or path)."""
        pixels = self.pixels([image])
        ids, mask = self.tokenizer.batch(texts, max_length=min(MATCH_TOKENS, self.model.config.text.max_positions))
        ids[:, 0] = self.tokenizer.cls_id  # texts start with [CLS] for matching, as HF's processor writes them
        image_tokens = self.model.visual_encoder(pixels)  # encoded once, read by every text
        return self.model.match(image_tokens, ids.to(self.device), mask.to(self.device)).float().cpu()


def rerank(captioner: Captioner, matcher: Matcher, image, tokens, caption: str, prompt: str, sampling: DecodeConfig,
           candidates: int, generator) -> tuple[str, float]:
    """The beam-search `caption` and `candidates` - 1 captions drawn by `sampling` of one image (PIL image or
    path), whose (1, N, C) tokens the beam search read -> the candidate the matching model scores best, and
    its score (ties: the earlier candidate, the beam's first)."""
    n = candidates - 1
    others = captioner.samples(tokens, n, prompt, sampling, generator) if n else []
    texts = list(dict.fromkeys([caption, *others]))  # distinct, in order
    scores = matcher.scores(image, texts)
    best = int(scores.argmax())
    return texts[best], float(scores[best])
