"""Our checkpoint folder: plain data, loadable without running any code.

    config.json         BlipConfig as JSON (plus "architecture": "BlipCaptioner")
    model.safetensors   the weights, named as in BlipCaptioner.state_dict()
    tokenizer.json      the `tokenizers` file, [DEC]/[ENC] included

Conversion from HF snapshots and original BLIP files lives in blip/convert.py.
"""

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import BlipConfig
from .tokenizer import Tokenizer

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
ARCHITECTURE = "BlipCaptioner"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


def save_model(model, folder, tokenizer: Tokenizer | None = None):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architecture": ARCHITECTURE, **model.config.to_dict()}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(folder / TOKENIZER)


def read_config(folder) -> BlipConfig:
    path = _need(Path(folder), CONFIG)
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.pop("architecture", None) != ARCHITECTURE:
        raise CheckpointError(
            f"{path}: not a {ARCHITECTURE} checkpoint (convert HF or original BLIP weights with convert_weights.py)"
        )
    try:
        return BlipConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_model(folder, map_location="cpu"):
    from .model import BlipCaptioner

    folder = Path(folder)
    config = read_config(folder)
    path = _need(folder, WEIGHTS)
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
    model = BlipCaptioner(config)
    check_state_dict(state, model.state_dict(), str(path))
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def load_tokenizer(folder) -> Tokenizer:
    path = _need(Path(folder), TOKENIZER)
    return Tokenizer.from_file(path)


def check_state_dict(state: dict, expected: dict, source: str):
    """Raise CheckpointError unless `state` has exactly the keys and shapes of `expected`."""
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: missing weight {missing[0]}" + _more(missing))
    if unknown:
        raise CheckpointError(f"{source}: unknown weight {unknown[0]}" + _more(unknown))
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(state[k].shape)}, the config needs {tuple(v.shape)}"
            )


def _more(keys: list) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def _need(folder: Path, name: str) -> Path:
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {name}: is it a checkpoint folder written by convert_weights.py?")
    return path
