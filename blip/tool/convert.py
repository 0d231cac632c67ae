"""Weight conversion: HF `BlipForConditionalGeneration` snapshots and original Salesforce BLIP
`.pth` files -> our checkpoint folder, and ours -> HF. Every name goes through the table of
blip/tool/names.py, every shape is checked, and anything else is an error.
"""

import json
import pickle
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from ..checkpoint import CheckpointError, architecture, check_state_dict, find_base, load_tokenizer, read_adapter
from ..config import BlipConfig, TextConfig, VisionConfig
from ..image import CLIP_MEAN, CLIP_STD
from ..lora import merge_lora
from ..tokenizer import Tokenizer, write_hf_files
from .names import HF, KINDS, ORIGINAL, OURS, rename


# --- reading source files -----------------------------------------------------------------
def read_tensors(path: Path) -> dict:
    """A safetensors / .bin / .pth file (or a sharded safetensors index) -> {name: tensor}."""
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_tensors(path.parent / shard).items()}
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused, the pickle holds more than tensors and could run code ({first[:200]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read ({str(e).strip().splitlines()[0][:200]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # original BLIP: {"model": state_dict, ...}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


# --- configs ------------------------------------------------------------------------------
# transformers writes only the values that differ from its class defaults
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          image_size=384, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5)
HF_TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=8, max_position_embeddings=512, hidden_act="gelu",
                        layer_norm_eps=1e-12, pad_token_id=0, bos_token_id=30522, sep_token_id=102)


def config_from_hf(d: dict, source: str) -> BlipConfig:
    if d.get("model_type") != "blip":
        raise CheckpointError(f"{source}: model_type is {d.get('model_type')!r}, expected 'blip'")
    v = {**HF_VISION_DEFAULTS, **(d.get("vision_config") or {})}
    t = {**HF_TEXT_DEFAULTS, **(d.get("text_config") or {})}
    for name, act in (("vision_config", v["hidden_act"]), ("text_config", t["hidden_act"])):
        if act != "gelu":
            raise CheckpointError(f"{source}: {name}.hidden_act is {act!r}; only exact 'gelu' is implemented")
    vision = VisionConfig(
        image_size=_square(v["image_size"], source), patch_size=_square(v["patch_size"], source),
        width=v["hidden_size"], depth=v["num_hidden_layers"], heads=v["num_attention_heads"],
        mlp_dim=v["intermediate_size"], ln_eps=v["layer_norm_eps"],
    )
    text = TextConfig(
        vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"],
        heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"], max_positions=t["max_position_embeddings"],
        ln_eps=t["layer_norm_eps"], encoder_width=vision.width,  # HF sets it from the vision width too
        pad_token_id=t["pad_token_id"], bos_token_id=t["bos_token_id"], sep_token_id=t["sep_token_id"],
    )
    return BlipConfig(vision=vision, text=text, embed_dim=d.get("image_text_hidden_size", BlipConfig.embed_dim))


def _square(size, source: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise CheckpointError(f"{source}: non-square size {size} is not supported")
        size = size[0]
    return int(size)


def config_to_hf(config: BlipConfig, kind: str = "BlipCaptioner") -> dict:
    v, t = config.vision, config.text
    return {
        "architectures": [KINDS[kind].hf_class], "model_type": "blip", "tie_word_embeddings": True,
        "image_text_hidden_size": config.embed_dim,
        "vision_config": {
            "model_type": "blip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": "gelu", "layer_norm_eps": v.ln_eps,
        },
        "text_config": {
            "model_type": "blip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
            "encoder_hidden_size": t.encoder_width, "intermediate_size": t.mlp_dim,
            "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
            "max_position_embeddings": t.max_positions, "hidden_act": "gelu", "layer_norm_eps": t.ln_eps,
            "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id, "sep_token_id": t.sep_token_id,
        },
    }


def config_from_original(state: dict, source: str, kind: str = "BlipCaptioner") -> BlipConfig:
    """Original .pth files hold no config: read sizes off the tensors (heads: width / 64)."""
    text_prefix = KINDS[kind].text_prefix
    def need(key):
        if key not in state:
            raise CheckpointError(f"{source}: missing weight {key}")
        return state[key]

    def count(prefix):
        return len({m.group(1) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})

    patch = need("visual_encoder.patch_embed.proj.weight")  # (C, 3, p, p)
    positions = need("visual_encoder.pos_embed").shape[1]
    grid = round((positions - 1) ** 0.5)
    width, p = patch.shape[0], patch.shape[-1]
    vision = VisionConfig(
        image_size=grid * p, patch_size=p, width=width, depth=count("visual_encoder.blocks."),
        heads=width // 64, mlp_dim=need("visual_encoder.blocks.0.mlp.fc1.weight").shape[0],
        ln_eps=1e-6,  # the original BLIP ViT's LayerNorm eps
    )
    word = need(text_prefix + "embeddings.word_embeddings.weight")
    text = TextConfig(
        vocab_size=word.shape[0], width=word.shape[1], depth=count(text_prefix + "encoder.layer."),
        heads=word.shape[1] // 64, mlp_dim=need(text_prefix + "encoder.layer.0.intermediate.dense.weight").shape[0],
        max_positions=need(text_prefix + "embeddings.position_embeddings.weight").shape[0], encoder_width=width,
    )
    embed_dim = need("vision_proj.weight").shape[0] if kind == "BlipRetrieval" else BlipConfig.embed_dim  # ITC width
    return BlipConfig(vision=vision, text=text, embed_dim=embed_dim)


# --- whole conversions --------------------------------------------------------------------
def load_source(src: Path, tokenizer_path=None):
    """An HF snapshot folder or an original BLIP .pth -> (kind, config, our state dict, tokenizer):
    kind is our model class's name, from HF's "architectures" or from the names of the weights."""
    if src.is_dir():
        cfg_path = src / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{src} has no config.json: not an HF snapshot folder")
        candidates = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
        weights = next((src / n for n in candidates if (src / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{src} has none of {', '.join(candidates)}")
        try:
            hf_config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
        config = config_from_hf(hf_config, str(cfg_path))
        raw = read_tensors(weights)
        named = hf_config.get("architectures") or []
        by_weights = any(k.startswith("itm_head.") for k in raw) and not any(k.startswith("text_decoder.") for k in raw)
        retrieval = "BlipForImageTextRetrieval" in named or (not named and by_weights)
        kind = "BlipRetrieval" if retrieval else "BlipCaptioner"
        _need_text(raw, weights, kind)
        state = rename(raw, HF, OURS, str(weights), KINDS[kind])
        tokenizer = _tokenizer(tokenizer_path or src)
    elif src.is_file():
        if tokenizer_path is None:
            raise CheckpointError(f"{src}: an original BLIP file holds no tokenizer; pass --tokenizer vocab.txt")
        raw = read_tensors(src)
        kind = "BlipCaptioner" if any(k.startswith("text_decoder.") for k in raw) else "BlipRetrieval"
        _need_text(raw, src, kind)
        state = rename(raw, ORIGINAL, OURS, str(src), KINDS[kind])
        tokenizer = _tokenizer(tokenizer_path)
        # no config in the file: sizes come from the tensors, special ids from the tokenizer
        config = config_from_original(raw, str(src), kind)
        ids = dict(bos_token_id=tokenizer.dec_id, sep_token_id=tokenizer.sep_id, pad_token_id=tokenizer.pad_id)
        config = replace(config, text=replace(config.text, **ids))
    else:
        raise CheckpointError(f"not found: {src}")
    t = config.text
    got = (len(tokenizer), tokenizer.dec_id, tokenizer.sep_id, tokenizer.pad_id)
    want = (t.vocab_size, t.bos_token_id, t.sep_token_id, t.pad_token_id)
    if got != want:
        raise CheckpointError(
            f"tokenizer (size, [DEC], [SEP], [PAD]) = {got} does not match the model's {want}: wrong vocab file?"
        )
    return kind, config, state, tokenizer


def _need_text(raw: dict, source, kind: str):
    """A captioning file has a text decoder; a retrieval file a text encoder and an ITM head."""
    needed = ["text_decoder."] if kind == "BlipCaptioner" else ["text_encoder.", "itm_head."]
    for prefix in needed:
        if not any(k.startswith(prefix) for k in raw):
            raise CheckpointError(f"{source}: no {prefix}* weights, so neither a captioning nor a retrieval checkpoint")


def _tokenizer(path):
    try:
        return Tokenizer.from_file(path)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None


def resize_positions(config: BlipConfig, state: dict, image_size: int) -> BlipConfig:
    """Resample the ViT's position grid (bicubic, class token kept) for a new input size."""
    v = config.vision
    if image_size % v.patch_size:
        raise CheckpointError(f"--image-size {image_size} is not a multiple of the patch size {v.patch_size}")
    grid = image_size // v.patch_size
    key = "visual_encoder.pos_embed"
    state[key] = resample_abs_pos_embed(state[key], [grid, grid], num_prefix_tokens=1, antialias=False)
    return replace(config, vision=replace(v, image_size=image_size))


def convert(src, out, tokenizer_path=None, image_size=None):
    """Convert an HF snapshot or original BLIP file into our checkpoint folder `out`."""
    src = Path(src)
    kind, config, state, tokenizer = load_source(src, tokenizer_path)
    if image_size and image_size != config.vision.image_size:
        config = resize_positions(config, state, image_size)
    model = KINDS[kind].model_class(config)
    check_state_dict(state, model.state_dict(), str(src))
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out, tokenizer)
    return model


def merge_adapters(folder, out):
    """A train.py --lora folder -> a full checkpoint folder: its adapters folded into the weights of the
    checkpoint they belong to (blip/lora.py merge_lora)."""
    adapter = read_adapter(folder)
    if adapter is None:
        raise CheckpointError(f"{folder} holds no LoRA adapters (no adapter.json): it is a full checkpoint already")
    base = find_base(Path(folder), adapter)
    for taken, what in ((Path(folder), "the adapter folder itself"), (base, "the checkpoint its adapters belong to")):
        if Path(out).resolve() == taken.resolve():
            raise CheckpointError(f"{out} is {what}: write the merged model to another folder")
    kind = architecture(folder)
    model = KINDS[kind].model_class.from_pretrained(folder)
    merge_lora(model)
    model.save_pretrained(out, load_tokenizer(folder))
    return model


def export_hf(ours, out):
    """Write our checkpoint folder as an HF snapshot that BlipForConditionalGeneration (or, for a
    BlipRetrieval folder, BlipForImageTextRetrieval) loads. A LoRA folder is merged on the way."""
    kind = architecture(ours)
    model, tokenizer = KINDS[kind].model_class.from_pretrained(ours), load_tokenizer(ours)
    merge_lora(model)  # nothing to do for a full checkpoint
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = rename(model.state_dict(), OURS, HF, str(ours), KINDS[kind])  # tied LM-head weights left out, as HF
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_hf(model.config, kind), indent=2) + "\n")
    write_hf_files(tokenizer, out)
    size = model.config.vision.image_size
    processor = {
        "image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor",
        "do_convert_rgb": True, "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def download(repo_id: str) -> Path:
    """Fetch an HF hub snapshot (needs huggingface_hub and a network)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id} is not a local path, and huggingface_hub is not installed to download it: "
            f"pip install huggingface_hub, or run `hf download {repo_id} --local-dir DIR` elsewhere and convert DIR"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
    except Exception as e:  # network, auth and missing-repo errors all end here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot download {repo_id}: {first[:200]}") from None
