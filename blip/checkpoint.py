"""Our checkpoint folder: plain data, loadable without running any code.

    config.json         BlipConfig as JSON, plus "architecture": "BlipCaptioner" or "BlipRetrieval"
    model.safetensors   the weights, named as in that model's state_dict()
    tokenizer.json      the `tokenizers` file, [DEC]/[ENC] included
    training.json       train.py's loop state (step, settings, ...), in its `last/` folder only
    training.safetensors   ... and its tensors: optimizer moments, random-number streams
    evaluation.json     the evaluation that chose these weights (step, losses, scores), in `best/` only

A LoRA folder (train.py --lora) holds adapters in place of the weights: config.json and tokenizer.json
as above, and
    adapter.safetensors the adapters' tensors alone (blip/lora.py)
    adapter.json        their rank, scale and layers, and the full checkpoint folder they belong to with
                        the sha256 of its model.safetensors, checked whenever the folder is loaded

Conversion from HF snapshots and original BLIP files lives in blip/tool/convert.py.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import BlipConfig
from .lora import LoraConfig, add_lora, load_lora_state_dict, lora_state_dict
from .speed.memory import drop_file_pages
from .tokenizer import Tokenizer

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
STATE, STATE_TENSORS, EVALUATION = "training.json", "training.safetensors", "evaluation.json"
ADAPTER, ADAPTER_WEIGHTS = "adapter.json", "adapter.safetensors"
ARCHITECTURES = ("BlipCaptioner", "BlipRetrieval")  # what config.json's "architecture" may say


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


def save_model(model, folder, tokenizer: Tokenizer | None = None):
    folder = Path(folder)
    _save_config(model, folder, tokenizer)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def _save_config(model, folder: Path, tokenizer: Tokenizer | None):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architecture": type(model).__name__, **model.config.to_dict()}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder / TOKENIZER)


# --- LoRA folders ---------------------------------------------------------------------------------
def _hash_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blip" / "sha256.json"


def weights_sha256(folder) -> str:
    """sha256 of a checkpoint folder's model.safetensors: what names the base of a LoRA folder. Computed once
    per file (0.9 GB at base size) and remembered by path, size and modification time (~/.cache/blip/)."""
    path = _need(Path(folder), WEIGHTS).resolve()
    st = path.stat()
    key, cache = f"{path}:{st.st_size}:{st.st_mtime_ns}", _hash_cache()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        with open(path, "rb") as f:
            known[key] = hashlib.file_digest(f, "sha256").hexdigest()
        try:  # written beside and renamed: two processes never leave half a file
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache)
        except OSError:  # a read-only home: hash again next time
            pass
    return known[key]


def save_adapters(model, folder, tokenizer: Tokenizer | None, adapter: dict):
    """A LoRA folder: config.json, tokenizer.json, the adapters' tensors and adapter.json, `adapter`:
    {"base": the full checkpoint folder, "base_sha256": weights_sha256 of it, "lora": LoraConfig.to_dict()}.
    adapter.json names the base by a path relative to the folder (a project or a runs/ folder moves whole)."""
    folder = Path(folder)
    _save_config(model, folder, tokenizer)
    tensors = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    base = Path(adapter["base"]).resolve()
    saved = {**adapter, "base": os.path.relpath(base, folder.resolve()),
             "base_bytes": (base / WEIGHTS).stat().st_size}
    (folder / ADAPTER).write_text(json.dumps(saved, indent=2) + "\n")


def read_adapter(folder) -> dict | None:
    """adapter.json of a LoRA folder ({"base": the path it names, resolved, "base_sha256", "lora"}); None for
    a full checkpoint."""
    path = Path(folder) / ADAPTER
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        LoraConfig.from_dict(d["lora"])
        return {"base": str((Path(folder) / d["base"]).resolve()), "base_sha256": str(d["base_sha256"]),
                "lora": d["lora"], "base_bytes": d.get("base_bytes")}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid adapter description ({e})") from None


def find_base(folder: Path, adapter: dict) -> Path:
    """The checkpoint a LoRA folder's adapters belong to: where adapter.json says, or else a checkpoint folder
    with the same weights (by sha256) near it: beside the folder or its parents, or under ./checkpoints."""
    named = Path(adapter["base"])
    if (named / WEIGHTS).is_file() and weights_sha256(named) == adapter["base_sha256"]:
        return named
    places = [*Path(folder).resolve().parents[:4], Path("checkpoints").resolve()]
    for place in dict.fromkeys(places):
        for weights in sorted(place.glob(f"*/{WEIGHTS}")) + sorted(place.glob(f"*/*/{WEIGHTS}")):
            if adapter.get("base_bytes") not in (None, weights.stat().st_size):
                continue  # not the same file: no need to hash it
            if weights_sha256(weights.parent) == adapter["base_sha256"]:
                return weights.parent
    if (named / WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: its LoRA adapters belong to {named} as it was (sha256 "
                              f"{adapter['base_sha256'][:12]}...), but that checkpoint's weights have changed")
    raise CheckpointError(f"{folder}: its LoRA adapters belong to {named}, which holds no {WEIGHTS} any more, and "
                          f"no checkpoint with those weights (sha256 {adapter['base_sha256'][:12]}...) is near it")


def _load_adapted(folder: Path, adapter: dict, model_class, map_location, config, dtype):
    """The base checkpoint adapter.json names (or found by its hash), with the folder's adapters on it."""
    base = find_base(folder, adapter)
    model = load_model(base, model_class, map_location, config or read_config(folder, model_class.__name__), dtype)
    add_lora(model, LoraConfig.from_dict(adapter["lora"]))
    path = folder / ADAPTER_WEIGHTS
    try:
        load_lora_state_dict(model, load_file(str(_need(folder, ADAPTER_WEIGHTS)), device=str(map_location)))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model.eval()


def _config_json(folder) -> tuple[Path, dict | None, str | None]:
    """config.json's path, its contents (None when not an object) and the architecture it names."""
    path = _need(Path(folder), CONFIG)
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    d = d if isinstance(d, dict) else None
    return path, d, d.pop("architecture", None) if d is not None else None


def architecture(folder) -> str:
    """Which model the folder holds: config.json's "architecture" (BlipCaptioner, BlipRetrieval)."""
    path, _, found = _config_json(folder)
    if found not in ARCHITECTURES:
        raise CheckpointError(f"{path}: not one of our checkpoints (convert weights with convert_weights.py)")
    return found


def read_config(folder, architecture: str = "BlipCaptioner") -> BlipConfig:
    """The folder's config, which must be of an `architecture` model."""
    path, d, found = _config_json(folder)
    if found in ARCHITECTURES and found != architecture:
        raise CheckpointError(f"{path}: holds a {found} model, not the {architecture} this needs")
    if found != architecture:
        raise CheckpointError(
            f"{path}: not a {architecture} checkpoint (convert HF or original BLIP weights with convert_weights.py)"
        )
    try:
        return BlipConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_model(folder, model_class, map_location="cpu", config: BlipConfig | None = None,
               dtype: torch.dtype | None = None):
    """The folder's `model_class` model (BlipCaptioner, BlipRetrieval); `config` (default: the
    folder's own) may change what weights do not fix, such as dropout. `dtype` (default fp32) is
    the dtype of its floating-point weights."""
    folder = Path(folder)
    adapter = read_adapter(folder)
    if adapter is not None:  # a LoRA folder: its base checkpoint, then the adapters
        return _load_adapted(folder, adapter, model_class, map_location, config, dtype)
    config = config or read_config(folder, model_class.__name__)
    path = _need(folder, WEIGHTS)
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
    # modules built on the meta device hold no memory and are not initialised; the file's tensors then
    # become the parameters (assign=True): nothing is drawn at random only to be overwritten, and the
    # weights are never in memory twice. They are the file's pages, mapped copy-on-write: our writers
    # always write a new file (replace_folder), never over a mapped one.
    with torch.device("meta"):
        model = model_class(config)
    expected = model.state_dict()
    check_state_dict(state, expected, str(path))
    for k, v in state.items():  # a bf16 file still loads as fp32 by default
        state[k] = v.to(dtype if dtype is not None and v.is_floating_point() else expected[k].dtype)
        if state[k] is not v:  # converted: the file's pages of it can go now, not all at the end
            drop_file_pages(v)
    model.load_state_dict(state, strict=True, assign=True)
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


# --- training state (train.py's OUT/last/) -------------------------------------------------------
def save_training_state(folder, state: dict, tensors: dict[str, torch.Tensor]):
    """`state` (JSON-able) to training.json, `tensors` to training.safetensors."""
    folder = Path(folder)
    (folder / STATE).write_text(json.dumps(state, indent=1) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / STATE_TENSORS))


def save_evaluation(folder, evaluation: dict):
    """The scores of the folder's weights (train.py's best/): evaluation.json."""
    (Path(folder) / EVALUATION).write_text(json.dumps(evaluation, indent=1) + "\n")


def read_evaluation(folder) -> dict | None:
    path = Path(folder) / EVALUATION
    return json.loads(path.read_text()) if path.is_file() else None


def load_training_state(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    path = _need(folder, STATE)
    try:
        state = json.loads(path.read_text())
        tensors = load_file(str(_need(folder, STATE_TENSORS)))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder}: cannot read the training state ({e})") from None
    return state, tensors


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """An optimizer's state dict as (JSON-able part, flat tensors named "optimizer.{param}.{key}")."""
    sd = optimizer.state_dict()
    tensors = {f"optimizer.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    return {"param_groups": sd["param_groups"]}, tensors


def restore_optimizer(optimizer: torch.optim.Optimizer, groups: dict, tensors: dict[str, torch.Tensor]):
    state = {}
    for name, v in tensors.items():
        if name.startswith("optimizer."):
            _, i, k = name.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def replace_folder(new: Path, folder: Path):
    """Make `new` (a finished folder) be `folder`. A kill at any instant leaves `folder` whole (the old
    or the new), or else `folder`.old whole, which `recover_folder` puts back."""
    for f in new.iterdir():  # contents on disk before the folder is published
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    recover_folder(folder)  # an earlier swap cut short: its .old is the only whole copy, and comes back first
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(folder: Path):
    """Undo an interrupted `replace_folder`: bring `folder`.old back when `folder` is missing, drop it
    when `folder` is whole. Safe when several processes do it at once."""
    old = folder.with_name(folder.name + ".old")
    if not old.is_dir():
        return
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(old, folder)
    except FileNotFoundError:  # another process brought it back first
        pass
