"""Fine-tune BLIP's captioner on a folder of captioned images, or train one from scratch.

    python train.py --data ./football                                # from checkpoints/blip-base
    python train.py --data data/shapes --init scratch --preset tiny --epochs 40
    python train.py --data ./football --out runs/football --resume   # after a crash or a kill
    python train.py --data ./mine --lora 16                          # adapters only: small checkpoints, less memory
    python train.py --data ./mine --freeze-vision --cache-image-tokens --augment flip   # the ViT run once per picture
    torchrun --nproc_per_node 4 train.py --data ./coco               # several GPUs (or CPU processes)

A run, in the order of this file; main() at the bottom reads as the recipe:
    arguments    parse_args: the flags, the recipe's defaults, a resumed run's saved settings
    output       claim_output: OUT/ is this run's (a finished save or its earlier copy, never half of one)
    processes    start_processes: the device; with torchrun, this process's rank among `world`
    data         read_data: every caption and picture read and checked before anything is written
    model        build_model: tokenizer, config, weights, LoRA adapters, what trains
    precision    pick_precision: autocast and fp16's gradient scaler
    batches      Batches: the seeded epoch order, cut into micro-batches and processes
    one step     train_step: forward, the loss over the whole batch's caption tokens, backward, clip, update
    the run      Run: OUT/metrics.jsonl, evaluation (best/, --patience), OUT/last/ to resume from, report.html
    the loop     train_loop: set the learning rate, step, log, evaluate, save; Ctrl-C or SIGTERM saves last/

OUT/last/ and OUT/best/ are checkpoint folders that caption.py --checkpoint takes as they are; last/ also
holds the loop state that --resume continues from, best/ the evaluation that chose it (evaluation.json).
With --lora, both hold the adapters alone and name the checkpoint they belong to (blip/lora.py);
`convert_weights.py --merge-lora` makes a full folder of them. Checkpoints carry their decoding defaults
(config.json "generation"): the evaluation's beams, and caption lengths that fit the training captions (the
longest plus a quarter, at least BLIP's 20 new tokens), which caption.py and Captioner then use.

--batch-size is the number of (image, caption) pairs of one optimizer step, however many processes
(torchrun) and micro-batches (--grad-accum) it is split into: the loss is the mean over the caption
tokens of the whole batch, so splitting changes memory and speed, not the result.
"""

import argparse
import itertools
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from blip import config as presets
from blip.checkpoint import (
    CheckpointError,
    load_tokenizer,
    load_training_state,
    optimizer_tensors,
    read_adapter,
    read_config,
    recover_folder,
    replace_folder,
    restore_optimizer,
    save_adapters,
    save_evaluation,
    save_model,
    save_training_state,
    weights_sha256,
)
from blip.config import BlipConfig, GenerationConfig
from blip.lora import DEFAULT as LORA_TARGETS
from blip.lora import (
    TEXT_LAYERS,
    LoraConfig,
    adapters,
    add_lora,
    add_token_rows,
    merge_lora,
    parse_targets,
    reaches_vision,
)
from blip.model import IGNORE, BlipCaptioner, caption_labels, caption_loss
from blip.speed import recompute
from blip.speed.memory import keep_freed_memory
from blip.tokenizer import Tokenizer
from blip.tool import plan
from blip.tool.blend import ALPHAS, blend_run
from blip.tool.captioner import cpu_has_bf16
from blip.tool.data import (
    HANDFUL,
    MAX_WORDS,
    Collate,
    DataError,
    Split,
    TrainSet,
    check_images,
    clean_caption,
    epoch_order,
    read_eval_set,
    read_replay_set,
    read_splits,
)
from blip.tool.evaluate import GALLERY, Evaluator, scores_line
from blip.tool.report import thumbnail, write_report
from blip.tool.token_cache import CacheError, ImageTokens, key_of

DEFAULT_INIT = "checkpoints/blip-base"
# what the flags leave open, by where the weights come from (a small set fine-tuned: blip/tool/plan.py).
# Pretrained weights on a large set: BLIP's COCO recipe. Random weights: what the shapes demo measured
# (docs/training.md, From scratch): a ViT trained at the decoder's rate, or on cropped pictures, learns
# colour and place but not shape
RECIPE = {
    "pretrained": {"vision_lr_scale": 1.0, "augment": "blip", "batch_size": 32, "epochs": 5, "patience": 0,
                   "dropout": 0.0},
    "scratch": {"lr": 2e-3, "vision_lr_scale": 0.1, "augment": "flip", "batch_size": 32, "epochs": 5, "patience": 0,
                "dropout": 0.0},
}
# what --resume cannot change: the model, what trains and how, the data and its order. Anything else
# (learning rate, steps, intervals, patience, precision, workers, device) may change.
FIXED_ON_RESUME = ("data", "replay", "replay_fraction", "val_fraction", "seed", "init", "preset", "tokenizer",
                   "vocab_size", "prompt", "batch_size", "augment", "dropout", "label_smoothing", "weight_decay",
                   "vision_lr_scale", "freeze_vision", "cache_image_tokens", "lora", "lora_alpha", "lora_targets",
                   "lora_tokens")
TEXT_LORA_TARGETS = tuple(t for t in LORA_TARGETS if not reaches_vision(t))  # the default with --freeze-vision
CPU_BF16_MIN_PARAMS = 100_000_000  # --amp auto on CPU: bf16 pays once matrix products dominate (docs/training.md)


class TrainError(Exception):
    """Why a run cannot start or go on: main prints it as one line ("error: ...") and exits with 1."""


def say(message: str):
    tqdm.write(message, file=sys.stderr)


# --- arguments -----------------------------------------------------------------------------------------
def add_data_flags(a):
    a("--data", metavar="DIR", help="data folder: metadata.jsonl/csv, COCO .json, parquet snapshot or .txt sidecars;\n"
      "train/ and val/ sub-folders are the splits when present")
    a("--out", metavar="DIR", help="where checkpoints, metrics.jsonl and report.html go (default: runs/<data name>)")
    a("--val-fraction", type=float, metavar="F", help="without a val/ split: fraction of images held out (default:\n"
      f"0.1; none of fewer than {HANDFUL} pictures, which then all train and the last weights are kept)")
    a("--eval-data", action="append", metavar="DIR", default=[],
      help="another validation set (its val/ split, or the whole folder), evaluated with\n"
      "the first; its metrics go into metrics.jsonl and report.html (repeatable: forgetting shows)")
    a("--replay", action="append", metavar="DIR", default=[],
      help="pictures of what the model knew (a data folder's train/, or all of it), mixed into\n"
      "every batch so that fine-tuning forgets less (repeatable; docs/training.md makes one\n"
      "from any pictures with the starting model's own captions)")
    a("--blend", type=float, metavar="KEEP", help="at the end, blend best/ with --init (blend.py): evaluate\n"
      "(1 - a) x start + a x best for a = 0, 0.25, ..., 1 and write OUT/blend/, the best on the\n"
      "validation set among those keeping KEEP of the start's CIDEr-D on every --eval-data set")
    a("--replay-fraction", type=float, default=0.25, metavar="F", help="with --replay: the share of every batch "
      "that comes from the replay sets\n(default: 0.25)")
    a("--skip-bad", action="store_true", help="train on the good rows when some are bad, instead of stopping")
    a("--prompt", default="a picture of ", help="text every caption starts with; not a target of the loss\n"
      "(default: 'a picture of ')")
    a("--augment", choices=["blip", "flip", "none"],
      help="blip: random resized crop, flip, RandAugment (BLIP's; the default fine-tuning a large\n"
      "set); flip: flips only (the default otherwise); none")


def add_model_flags(a):
    a("--init", default=DEFAULT_INIT, metavar="DIR",
      help=f"checkpoint folder to fine-tune (default: {DEFAULT_INIT}), or 'scratch' for random weights;\n"
      "a --lora run's folder is merged first, then all of its weights train")
    a("--preset", choices=list(presets.PRESETS), default="tiny", help="model size with --init scratch (default: tiny)")
    a("--tokenizer", metavar="FILE", help="with --init scratch: tokenizer.json or vocab.txt; default: a WordPiece\n"
      "vocabulary trained on the data's captions")
    a("--vocab-size", type=int, default=1000, help="size of that trained vocabulary (default: 1000)")
    a("--dropout", type=float, help=f"text dropout in training (default: {plan.DROPOUT} for a small set fine-tuned\n"
      f"with {plan.DROPOUT_PASSES} or more passes over each picture, else 0, as HF's checkpoints;\n"
      "the original BLIP trained with 0.1)")
    a("--freeze-vision", action="store_true", help="train the text decoder only; the ViT stays as loaded")
    a("--cache-image-tokens", action="store_true",
      help="with --freeze-vision: compute each picture's image tokens once per view (as it is, and\n"
      "mirrored with --augment flip) into OUT/image_tokens/, and train the decoder on them\n"
      "(needs --augment flip or none: random crops cannot be computed ahead)")
    a("--lora", type=int, metavar="RANK", help="train low-rank adapters of this rank instead of the weights\n"
      "(blip/lora.py); OUT/last/ and OUT/best/ then hold the adapters alone")
    a("--lora-alpha", type=float, help="adapter scale alpha / rank (default: alpha = 2 x rank)")
    a("--lora-targets", metavar="NAMES", help="comma-separated layer names to adapt; 'text.' or 'vision.' before\n"
      f"a name limits it to one tower (default: {','.join(LORA_TARGETS)};\n"
      f"with --freeze-vision: {','.join(TEXT_LORA_TARGETS)})")
    a("--lora-tokens", choices=["data", "none"], default="data",
      help="with --lora, data (default): the word vectors of every token the training captions and\n"
      "the prompt use train too (the LM head reads them: tied), so that words the model never\n"
      "wrote can be learned; a few KB per token, saved with the adapters. none: adapters only")


def add_optimizer_flags(a):
    a("--epochs", type=int, help="passes over the training captions (default: 5, as BLIP on COCO; a small set\n"
      "fine-tuned gets a number of steps from its size instead: blip/tool/plan.py)")
    a("--max-steps", type=int, help="stop after this many optimizer steps (the schedule ends there too)")
    a("--batch-size", type=int, help="(image, caption) pairs per optimizer step, all processes together\n"
      f"(default: 32; {plan.BATCH} for a small set fine-tuned)")
    a("--grad-accum", type=int, default=1, help="split each batch into this many micro-batches, to save memory")
    a("--lr", type=float, help="peak learning rate (default: for the model's width and the batch, blip/tool/plan.py,\n"
      f"{plan.LORA_LR_SCALE}x that with --lora on a small set; {RECIPE['scratch']['lr']:g} from scratch)")
    a("--vision-lr-scale", type=float, help=f"the ViT learns at lr times this (default: {plan.VISION_LR_SCALE:g} for a "
      "small set,\n1 for a large one, 0.1 from scratch)")
    a("--weight-decay", type=float, default=0.05, help="AdamW weight decay, not on norms, biases, embeddings "
      "(default: 0.05)")
    a("--warmup", type=float, default=0.05, help="fraction of the steps with a linear warm-up; cosine decay to 0\n"
      "after it (default: 0.05)")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off; default: 1.0)")
    a("--label-smoothing", type=float, default=0.1, help="label smoothing of the loss (default: 0.1, as BLIP)")


def add_speed_flags(a):
    a("--grad-checkpointing", nargs="?", const="full", default="auto", choices=["auto", *recompute.MODES],
      help="what backward recomputes instead of keeping (blip/speed/recompute.py). full (the flag alone):\n"
      "whole blocks, the least memory, ~1/3 more compute; elementwise: norms, GELU and adds, the\n"
      "same gradients, ~400 MB less for base at batch 4; none; auto (default): elementwise on CPU\n"
      "for models of 100 M parameters or more, else none; with --lora always none")
    a("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
      help="mixed precision; auto: bf16 on CUDA GPUs that have it, else fp16 with a\n"
      "gradient scaler; on CPU, bf16 for base-size models and larger where the CPU has\n"
      "AVX-512 BF16 or AMX (measured 2x fp32), else off (fp32)")
    a("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    a("--workers", type=int, help="data-loading processes (default: 0 on CPU, 6 on CUDA)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available")


def add_run_flags(a):
    a("--seed", type=int, default=0, help="seed for initialisation, data order, augmentation and the split")
    a("--eval-every", type=int, help="evaluate every N steps (default: every epoch; a tenth of the steps for a\n"
      "small set fine-tuned)")
    a("--save-every", type=int, default=0, help="write OUT/last/ every N steps (default: 0, with every evaluation)")
    a("--log-every", type=int, default=10, help="write a metrics line every N steps (default: 10)")
    a("--num-beams", type=int, default=3, help="beam width of the evaluation captions, saved as the checkpoint's\n"
      "default (default: 3)")
    a("--max-new-tokens", type=int, metavar="N", help="longest evaluation caption in tokens, saved as the\n"
      "checkpoint's default (default: the longest training caption plus a quarter, at least 20)")
    a("--min-new-tokens", type=int, metavar="N", help="shortest evaluation caption in tokens, saved likewise\n"
      "(default: 5, or the shortest training caption's length when shorter)")
    a("--patience", type=int, metavar="N", help="stop after N evaluations without a better CIDEr-D\n"
      f"(best/ keeps the best; default: {plan.PATIENCE} for a small set fine-tuned, else 0: never)")
    a("--resume", action="store_true", help="continue the run in --out from OUT/last/ with its saved settings;\n"
      "learning rate, steps, intervals, patience, precision, workers and device may be\n"
      "given anew, the model, what trains and the data may not")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage of forty flags above it
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    for title, add in (("data", add_data_flags), ("model", add_model_flags), ("optimizer", add_optimizer_flags),
                       ("speed and memory", add_speed_flags), ("the run", add_run_flags)):
        add(p.add_argument_group(title).add_argument)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The run's settings: the flags, then the recipe's defaults. With --resume, the run's saved settings
    are the defaults; a flag that cannot change on resume (FIXED_ON_RESUME) and differs is a TrainError."""
    p = build_parser()
    args = p.parse_args(argv)
    saved = None
    if args.resume:
        if args.out is None:
            p.error("--resume needs --out, the folder of the run to continue")
        try:
            saved, _ = load_training_state(recover_outputs(Path(args.out)) / "last")
        except CheckpointError as e:
            p.error(f"nothing to resume in {args.out}: {e}")
        saved = saved["args"]
        if isinstance(saved.get("grad_checkpointing"), bool):  # runs saved when the flag was on/off
            saved["grad_checkpointing"] = "full" if saved["grad_checkpointing"] else "auto"
        p.set_defaults(**saved)
        args = p.parse_args(argv)
        args.resume = True
    if args.data is None:
        p.error("--data is required")
    if args.out is None:
        args.out = str(Path("runs") / Path(args.data).resolve().name)
    for name in FIXED_ON_RESUME if saved else ():
        if name in saved and not same_setting(name, getattr(args, name), saved[name]):
            flag, value = "--" + name.replace("_", "-"), saved[name]
            how = "without " + flag if value is None or value is False else flag if value is True else f"{flag} {value}"
            raise TrainError(f"{flag} cannot change on --resume: the run in {args.out} was started {how} "
                             "(to change it, start a new run with another --out)")
    check_args(p, args)
    return args


def same_setting(name: str, a, b) -> bool:
    """Equal settings; a folder or file spelled differently (relative, absolute) is the same one."""
    if name in ("data", "init", "tokenizer") and isinstance(a, str) and isinstance(b, str):
        return a == b or Path(a).resolve() == Path(b).resolve()
    if name == "lora_targets" and isinstance(a, str) and isinstance(b, str):
        return [t.strip() for t in a.split(",") if t.strip()] == b.split(",")
    return a == b


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace):
    """Refuse (as usage errors) settings that do not go together; resolve the LoRA ones."""
    for name in ("grad_accum", "num_beams", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("epochs", "batch_size", "max_new_tokens", "lora", "max_steps", "eval_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.min_new_tokens is not None and args.min_new_tokens < 0 or (args.patience or 0) < 0:
        p.error("--min-new-tokens and --patience must not be negative")
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    if not 0 <= args.warmup < 1 or not 0 <= args.label_smoothing < 1 or not 0 <= (args.dropout or 0) < 1:
        p.error("--warmup, --label-smoothing and --dropout must be in [0, 1)")
    if not 0 <= args.replay_fraction < 1:
        p.error("--replay-fraction must be in [0, 1)")
    if args.blend is not None and (args.init == "scratch" or not 0 <= args.blend <= 1):
        p.error("--blend KEEP needs a checkpoint to blend with (--init) and KEEP in [0, 1]")
    if args.cache_image_tokens and not args.freeze_vision:
        p.error("--cache-image-tokens needs --freeze-vision: tokens of a ViT that learns change every step")
    if args.cache_image_tokens and args.augment == "blip":
        p.error("--cache-image-tokens cannot cache random crops (--augment blip): add --augment flip or none")
    if (args.lora_alpha is not None or args.lora_targets) and not args.lora:
        p.error("--lora-alpha and --lora-targets need --lora RANK")
    if not args.lora:
        return
    if args.grad_checkpointing == "elementwise":
        p.error("--lora updates layer outputs in place, which --grad-checkpointing elementwise keeps: use none "
                "(the default with --lora) or full")
    args.lora_alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora
    default = TEXT_LORA_TARGETS if args.freeze_vision else LORA_TARGETS
    try:
        targets = parse_targets(args.lora_targets or ",".join(default))
    except ValueError as e:
        p.error(f"--lora-targets: {e}")
    frozen = [t for t in targets if reaches_vision(t)] if args.freeze_vision else []
    if frozen:
        name = frozen[0].rpartition(".")[2]
        instead = f"text.{name}" if name in TEXT_LAYERS else f"layers of the text model ({', '.join(TEXT_LAYERS)})"
        p.error(f"--lora-targets {frozen[0]} adapts the ViT, which --freeze-vision keeps as loaded: name {instead}")
    args.lora_targets = ",".join(targets)


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`: linear warm-up over the first
    `warmup` fraction of the steps, then cosine decay to 0."""
    warm = math.ceil(warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# --- output: OUT/ belongs to this run ---------------------------------------------------------------------
def recover_outputs(out: Path) -> Path:
    """Undo a save cut short in OUT/last/ and OUT/best/: each is then its newest whole copy."""
    for name in ("last", "best"):
        recover_folder(out / name)
    return out


def claim_output(args):
    out = recover_outputs(Path(args.out))
    if (out / "last").exists() and not args.resume:
        raise TrainError(f"{out} already holds a run: add --resume to continue it, or choose another --out")


# --- processes --------------------------------------------------------------------------------------------
@dataclass
class Processes:
    """This process among the run's: its device, and under torchrun its rank among `world` processes.
    Rank 0 ("master") writes OUT/ and evaluates; the methods are the run's only meeting points."""

    device: torch.device
    rank: int = 0
    world: int = 1
    distributed: bool = False  # started by torchrun (even as one process): DDP and collective calls

    @property
    def master(self) -> bool:
        return self.rank == 0

    def log(self, message: str):
        if self.master:
            say(message)

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def share(self, value):
        """Rank 0's `value` (any picklable object), on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the processes, in place."""
        if self.distributed:
            dist.all_reduce(t)
        return t

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def start_processes(args) -> Processes:
    keep_freed_memory()  # fewer page faults per step (blip/speed/memory.py)
    name = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was asked for, but no CUDA GPU is available")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if name == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:  # not started by torchrun
        return Processes(device)
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return Processes(device, dist.get_rank(), dist.get_world_size(), distributed=True)


# --- data: read and check everything before anything is written --------------------------------------------
@dataclass
class Data:
    train: Split
    val: Split
    extra: dict[str, Split]  # --eval-data sets by name
    replay: Split  # --replay sets, together
    keep_last: bool = False  # no pictures held out: val is the training pictures, best/ the last weights


def eval_set_names(folders: list[str]) -> dict[str, str]:
    """--eval-data folders by the name their metrics take: the folder's name (its parent's, for a
    val/ folder), numbered when two are the same."""
    names = {}
    for folder in folders:
        path = Path(folder).resolve()
        name = path.parent.name if path.name in ("val", "validation", "valid") else path.name
        names[name if name not in names else f"{name}-{len(names) + 1}"] = folder
    return names


def read_data(args, procs: Processes) -> Data:
    try:
        train_split, val_split = read_splits(args.data, args.val_fraction, args.seed)
        extra = {name: read_eval_set(d) for name, d in eval_set_names(args.eval_data).items()}
        replay = Split()
        for folder in args.replay:
            one = read_replay_set(folder)
            replay.rows += one.rows
            replay.problems += one.problems
    except DataError as e:
        raise TrainError(str(e)) from None
    n_images = sum(len(s.rows) for s in (train_split, val_split, replay, *extra.values()))
    with tqdm(total=n_images, desc="checking images", unit="image", disable=not procs.master or n_images < 100,
              file=sys.stderr) as bar:
        data = Data(check_images(train_split, bar), check_images(val_split, bar),
                    {name: check_images(split, bar) for name, split in extra.items()}, check_images(replay, bar))
    problems = [p for split in (data.train, data.val, data.replay, *data.extra.values()) for p in split.problems]
    if problems:
        for problem in problems:
            procs.log(f"bad row: {problem}")
        if not args.skip_bad:
            raise TrainError(f"{len(problems)} bad row(s) in {args.data} (listed above); fix them, or pass --skip-bad "
                             "to train on the rest")
        procs.log(f"--skip-bad: dropped {len(problems)} bad row(s), training on the rest")
    if not data.train.rows:
        raise TrainError(f"{args.data}: no pictures to train on")
    if not data.val.rows:  # none held out (a handful of pictures, or --val-fraction 0): evaluate on the training
        data.val, data.keep_last = Split(rows=data.train.rows), True  # pictures, and keep the last weights
    if args.val_fraction is None:  # saved as it ran
        args.val_fraction = 0.0 if data.keep_last else 0.1
    empty = [name for name, split in data.extra.items() if not split.rows]
    if empty:
        raise TrainError(f"--eval-data {empty[0]}: no images to evaluate on")
    if args.replay and not data.replay.rows:
        raise TrainError(f"--replay {' '.join(args.replay)}: no pictures to replay")
    return data


# --- model: tokenizer, config, weights, adapters, what trains ------------------------------------------------
@dataclass
class Setup:
    """The model to train and what goes with it."""

    model: BlipCaptioner
    tokenizer: Tokenizer
    config: BlipConfig  # with the run's dropout, label smoothing, prompt and decoding defaults
    adapter: dict | None  # with --lora: adapter.json of the run's folders (blip/checkpoint.py)
    prompt_length: int  # the prompt's tokens, which are not targets
    max_tokens: int  # longest token sequence of any caption: [DEC], prompt, caption, [SEP]
    caption_tokens: tuple[int, int]  # shortest and longest training caption, in new tokens
    small: bool  # the small-set plan (plan_run)


def caption_lengths(rows, tokenizer) -> tuple[int, int]:
    """(shortest, longest) caption of `rows` in new tokens: its word pieces as training cleans it, plus [SEP]."""
    lengths = [len(tokenizer.tokens(clean_caption(c, MAX_WORDS))) + 1 for row in rows for c in row.captions]
    return min(lengths), max(lengths)


def fit_generation(shortest: int, longest: int, room: int, args) -> GenerationConfig:
    """Decoding defaults for captions like the training ones, unless flags say otherwise: up to the
    longest plus a quarter, never fewer than BLIP's 20 new tokens (nor more than the positions left:
    `room`); at least BLIP's 5, unless a training caption is shorter (a floor above it would make
    captions longer than any the model was taught)."""
    most = args.max_new_tokens or min(room, max(20, longest + longest // 4 + 1))
    least = args.min_new_tokens if args.min_new_tokens is not None else min(5, shortest)
    return GenerationConfig(num_beams=args.num_beams, max_new_tokens=min(most, room), min_new_tokens=min(least, most))


def tokenizer_and_config(args, procs: Processes, data: Data) -> tuple[Tokenizer, BlipConfig, Path | None]:
    """The tokenizer, the config and the folder the weights come from (None: random weights)."""
    last = Path(args.out) / "last"
    if args.resume:
        return load_tokenizer(last), read_config(last), last
    if args.init != "scratch":
        if not Path(args.init).is_dir():
            raise TrainError(f"no checkpoint folder at {args.init}; make one with `python convert_weights.py "
                             f"Salesforce/blip-image-captioning-base {args.init}` (docs/checkpoints.md), "
                             "or train from random weights with --init scratch")
        return load_tokenizer(args.init), read_config(args.init), Path(args.init)
    if args.tokenizer:
        tokenizer = Tokenizer.from_file(args.tokenizer)
    else:  # trained once, on rank 0, and shared, so every process has the same vocabulary
        texts = [args.prompt] + [clean_caption(c) for r in data.train.rows for c in r.captions]
        tokenizer = Tokenizer.from_str(procs.share(Tokenizer.train(texts, args.vocab_size).to_str()
                                                   if procs.master else None))
    return tokenizer, presets.with_tokenizer(presets.PRESETS[args.preset](), tokenizer), None


def build_model(args, procs: Processes, data: Data) -> Setup:
    try:
        tokenizer, config, init = tokenizer_and_config(args, procs, data)
    except (CheckpointError, ValueError, OSError) as e:
        raise TrainError(str(e)) from None
    # caption lengths from the data: training keeps whole captions, evaluation and the checkpoint's
    # decoding defaults leave room for the longest (docs/training.md: caption lengths)
    prompt_length = len(tokenizer.tokens(args.prompt))
    room = config.text.max_positions - 1 - prompt_length  # new tokens that fit after [DEC] and the prompt
    if room < 2:
        raise TrainError(f"the prompt {args.prompt!r} leaves no room in the model's {config.text.max_positions} "
                         "positions")
    shortest, longest = caption_lengths(data.train.rows, tokenizer)
    splits = [data.train, data.val, *data.extra.values()]
    max_tokens = 1 + prompt_length + min(room, max(caption_lengths(s.rows, tokenizer)[1] for s in splits))
    small = plan_run(args, data, config.text.width)  # the settings the flags left open, dropout among them
    config = replace(config, text=replace(config.text, dropout=args.dropout),
                     generation=fit_generation(shortest, longest, room, args),
                     label_smoothing=args.label_smoothing, prompt=args.prompt)
    torch.manual_seed(args.seed)
    try:
        model = BlipCaptioner(config) if init is None else BlipCaptioner.from_pretrained(init, config=config)
    except (CheckpointError, ValueError) as e:
        raise TrainError(str(e)) from None
    adapter = choose_trainable(args, model, init, caption_token_ids(data.train.rows + data.replay.rows, tokenizer,
                                                                    args.prompt)
                               if args.lora and args.lora_tokens == "data" and not args.resume else [])
    model.to(procs.device).train()
    model.set_recompute(recompute.pick_mode(args.grad_checkpointing, model, procs.device))
    return Setup(model, tokenizer, config, adapter, prompt_length, max_tokens, (shortest, longest), small)


def caption_token_ids(rows, tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Every token id of the training sequences ([DEC] prompt caption [SEP]): the rows --lora-tokens trains."""
    ids = set(tokenizer.encode_prompt(prompt)) | {tokenizer.sep_id}
    for row in rows:
        for caption in row.captions:
            ids.update(tokenizer.tokens(clean_caption(caption, MAX_WORDS)))
    return sorted(ids)


def choose_trainable(args, model: BlipCaptioner, init: Path | None, token_ids: list[int]) -> dict | None:
    """Which weights train: with --lora the adapters alone, and the rows of `token_ids` of the word
    embeddings with --lora-tokens data (returns adapter.json's contents); else every weight but the ViT's
    with --freeze-vision. A --lora run's folder as --init is merged first."""
    if args.resume and args.lora:  # last/ holds the adapters, loaded onto their base, which stays frozen
        return read_adapter(init)
    if args.lora:
        if init is None:
            raise TrainError("--lora adapts a trained checkpoint: give one with --init, not scratch")
        if adapters(model):
            raise TrainError(f"{init} holds LoRA adapters: make a full checkpoint of it first with "
                             f"`python convert_weights.py --merge-lora {init} MERGED`, and train from MERGED")
        lora = LoraConfig(args.lora, args.lora_alpha, tuple(args.lora_targets.split(",")))
        add_lora(model, lora)
        if args.lora_tokens == "data":
            add_token_rows(model, token_ids)
        return {"base": str(init.resolve()), "base_sha256": weights_sha256(init), "lora": lora.to_dict()}
    merge_lora(model)  # a LoRA run's folder (as --init): its adapters become weights
    model.requires_grad_(True)
    if args.freeze_vision:
        model.visual_encoder.requires_grad_(False)
    return None


def param_groups(model, weight_decay: float, vision_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only (not on norms, biases, embeddings, class
    token, positions); the ViT's learning rate is the decoder's times `vision_lr_scale`."""
    groups = {(vision, decay): [] for vision in (True, False) for decay in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        embedding = "embeddings." in name or name.endswith(("pos_embed", "cls_token"))
        groups[name.startswith("visual_encoder."), p.dim() >= 2 and not embedding].append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr_scale": vision_lr_scale if vision else 1.0}
            for (vision, decay), params in groups.items() if params]


# --- plan: what the flags leave to the data (blip/tool/plan.py) ------------------------------------------------
def plan_run(args, data: Data, width: int) -> bool:
    """Fill in the settings the flags left open, from the data and the model's width, in `args` (so that the
    log and last/ say what ran); build_model calls it before it makes the model, which takes the dropout.
    True for the small-set plan: pretrained weights, fewer than plan.SMALL_SET captions."""
    n = sum(len(row.captions) for row in data.train.rows)
    small = args.init != "scratch" and n < plan.SMALL_SET
    batch = args.batch_size
    if small:
        batch = batch or min(plan.BATCH, n)
        steps = args.max_steps or (plan.small_set_steps(n, batch) if args.epochs is None else None)
        chosen = {"lr": plan.small_set_lr(width, batch, lora=bool(args.lora)), "max_steps": steps,
                  "patience": 0 if data.keep_last else plan.PATIENCE,
                  "eval_every": max(1, steps // 10) if steps else None,
                  "vision_lr_scale": plan.VISION_LR_SCALE, "augment": "flip",
                  "dropout": plan.small_set_dropout(steps * batch / n if steps else args.epochs, data.keep_last)}
    elif args.init != "scratch":  # BLIP's rate, at this width and batch
        batch = batch or RECIPE["pretrained"]["batch_size"]
        chosen = {"lr": plan.BLIP_LR * plan.BLIP_WIDTH / width * math.sqrt(batch / plan.BLIP_BATCH)}
    else:
        chosen = {}
    recipe = RECIPE["scratch" if args.init == "scratch" else "pretrained"]
    for name, value in [*chosen.items(), ("batch_size", batch), *recipe.items()]:
        if getattr(args, name) is None and not (name == "epochs" and args.max_steps):  # the flags win
            setattr(args, name, value)
    return small


# --- precision ------------------------------------------------------------------------------------------------
@dataclass
class Precision:
    amp: str  # what ran: bf16, fp16 or off
    autocast: object  # () -> a context manager
    scaler: torch.amp.GradScaler  # fp16's loss scaling; a no-op otherwise


def pick_precision(args, model, device: torch.device) -> Precision:
    amp = args.amp
    if amp == "auto" and device.type == "cuda":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif amp == "auto":  # bf16 autocast: 2x fp32 for the base model on such CPUs, 0.8x for the tiny one
        big = sum(p.numel() for p in model.parameters()) >= CPU_BF16_MIN_PARAMS
        amp = "bf16" if big and cpu_has_bf16() else "off"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    return Precision(amp, autocast, torch.amp.GradScaler(device.type, enabled=amp == "fp16"))


# --- batches: the epoch order and every augmentation are fixed by the seed -------------------------------------
def split_batch(items: list, parts: int) -> list[list]:
    """Cut a batch into `parts` contiguous pieces whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]


@dataclass
class Batch:
    """One micro-batch on the device: pictures as pixels, or (cached) as their image tokens."""

    pixels: torch.Tensor | None  # (B, 3, H, W)
    image_tokens: torch.Tensor | None  # (B, N, C_img), --cache-image-tokens
    ids: torch.Tensor  # (B, T) [DEC] prompt caption [SEP] [PAD]...
    mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) ids with [DEC], prompt and pads as IGNORE


class Batches:
    """The run's batches: `batch` pairs per optimizer step in a seeded order, each cut into --grad-accum
    micro-batches and those into one part per process. An epoch is one pass over the training captions.
    With --replay, `replayed` of the `batch` pairs come from the replay sets, in a seeded order of their own."""

    def __init__(self, args, procs: Processes, setup: Setup, data: Data):
        self.args, self.procs, self.setup = args, procs, setup
        # the replay sets' pairs come after the training pairs: indices n_train and on
        self.train_set = TrainSet(data.train.rows + data.replay.rows, setup.config.vision.image_size, args.prompt,
                                  args.augment, cached=args.cache_image_tokens)
        self.n_replay = sum(len(row.captions) for row in data.replay.rows)
        self.n_train = len(self.train_set) - self.n_replay
        self.replayed = round(args.replay_fraction * args.batch_size) if self.n_replay else 0
        self.batch = min(args.batch_size - self.replayed, self.n_train) + self.replayed
        if self.batch < args.grad_accum * procs.world:
            raise TrainError(f"a batch of {self.batch} pairs cannot be split into {args.grad_accum} micro-batches on "
                             f"{procs.world} process(es)")
        self.steps_per_epoch = self.n_train // (self.batch - self.replayed)
        self.total = args.epochs * self.steps_per_epoch if args.max_steps is None else args.max_steps
        self.collate = Collate(setup.tokenizer, setup.max_tokens)
        self.workers = args.workers if args.workers is not None else (6 if procs.device.type == "cuda" else 0)
        self.image_tokens = None  # --cache-image-tokens: ImageTokens, set by cache_image_tokens
        self.replay_order = (None, [])  # (pass, its order) of the replay pass being read

    def samples(self, step: int):
        """This process's micro-batches from optimizer step `step` on: lists of (pair, seed)."""
        epoch, fresh = step // self.steps_per_epoch, self.batch - self.replayed
        while True:
            order = epoch_order(self.n_train, epoch, self.args.seed)
            for b in range(step - epoch * self.steps_per_epoch, self.steps_per_epoch):
                batch = order[b * fresh : (b + 1) * fresh] + self.replay_part(epoch * self.steps_per_epoch + b)
                for micro in split_batch(batch, self.args.grad_accum):
                    yield split_batch(micro, self.procs.world)[self.procs.rank]
            epoch, step = epoch + 1, (epoch + 1) * self.steps_per_epoch

    def replay_part(self, step: int) -> list:
        """The replay pairs of optimizer step `step`: the next `replayed` of an endless sequence of seeded
        passes over the replay sets."""
        part = []
        for position in range(step * self.replayed, (step + 1) * self.replayed):
            epoch, i = divmod(position, self.n_replay)
            if self.replay_order[0] != epoch:  # a stream of its own (seed + 1), not the training pairs'
                self.replay_order = (epoch, epoch_order(self.n_replay, epoch, self.args.seed + 1))
            pair, seed = self.replay_order[1][i]
            part.append((self.n_train + pair, seed))
        return part

    def from_step(self, step: int):
        """Each optimizer step's micro-batches (a list of Batch), from `step` on."""
        device = self.procs.device
        loader = iter(torch.utils.data.DataLoader(  # its own generator: the global stream is dropout's
            self.train_set, batch_sampler=self.samples(step), collate_fn=self.collate, num_workers=self.workers,
            pin_memory=device.type == "cuda", generator=torch.Generator()))
        cached = self.image_tokens is not None
        while True:
            micro = []
            for images, ids, mask in (next(loader) for _ in range(self.args.grad_accum)):
                labels = caption_labels(ids, mask, self.setup.prompt_length, self.setup.config.text.bos_token_id)
                if cached:  # the samples name views of the cache: their tokens stand for the pixels
                    images = self.image_tokens[images]
                images, ids, mask, labels = (t.to(device, non_blocking=True) for t in (images, ids, mask, labels))
                micro.append(Batch(None if cached else images, images if cached else None, ids, mask, labels))
            yield micro


def cache_image_tokens(args, procs: Processes, setup: Setup, batches: Batches, precision: Precision):
    """--cache-image-tokens: the frozen ViT run once per picture and view, into OUT/image_tokens/
    (blip/tool/token_cache.py). Rank 0 makes the file; every process computes its share of the views."""
    if not args.cache_image_tokens:
        return
    rows, transform = batches.train_set.rows, batches.train_set.transform
    vit, folder = setup.model.visual_encoder, Path(args.out) / "image_tokens"
    key = key_of(vit, rows, transform, precision.amp)
    tokens = ImageTokens.open(folder, key) if procs.master else None
    if procs.share(tokens is None):  # not made yet, or made from something else
        n = len(rows) * transform.views
        what = None
        if procs.master:
            try:
                what = ImageTokens.create(folder, (n, vit.cfg.num_tokens, vit.cfg.width))
            except CacheError as e:
                what = e
        what = procs.share(what)
        if isinstance(what, CacheError):
            raise TrainError(str(what))
        procs.log(f"computing the image tokens: {what}")
        share = split_batch(range(n), procs.world)[procs.rank]
        with tqdm(total=len(share), desc="image tokens", unit="view", disable=not procs.master, file=sys.stderr) as bar:
            ImageTokens.fill(folder, share, vit, rows, transform, batches.batch, precision.autocast, bar)
        procs.barrier()
        if procs.master:
            ImageTokens.finish(folder, key)
        procs.barrier()
    batches.image_tokens = ImageTokens(np.load(folder / "tokens.npy", mmap_mode="r"))


# --- one optimizer step ------------------------------------------------------------------------------------------
def train_step(model, micro: list[Batch], optimizer, precision: Precision, args, procs: Processes) -> tuple:
    """One optimizer step on one batch of micro-batches (this process's part of it). The loss is the mean
    over every caption token of the whole batch, whichever micro-batch and process holds it, so the
    gradient does not depend on how the batch is split. Returns this process's share of that mean loss,
    with and without label smoothing, and the pairs the step saw (all processes)."""
    n_tokens = torch.tensor(float(sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in micro)), device=procs.device)
    procs.sum(n_tokens)
    loss_sum = nll_sum = 0.0
    for i, b in enumerate(micro):
        # DDP averages gradients over processes at the last micro-batch's backward only
        sync = model.no_sync() if procs.distributed and i < len(micro) - 1 else nullcontext()
        with sync, precision.autocast():
            logits = model(b.pixels, b.ids, b.mask, image_embeds=b.image_tokens)  # (B, T, vocab)
            loss = caption_loss(logits, b.labels, args.label_smoothing, "sum")
        precision.scaler.scale(loss * procs.world / n_tokens).backward()  # DDP divides by world: undone
        loss_sum += loss.item()
        # the same loss without label smoothing: what validation reports, so the curves compare
        nll = caption_loss(logits.detach(), b.labels, 0.0, "sum") if args.label_smoothing else loss
        nll_sum += nll.item()
    if args.grad_clip > 0:
        precision.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    precision.scaler.step(optimizer)
    precision.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    share = procs.world / n_tokens.item()  # this process's share of the batch's mean, rescaled
    return loss_sum * share, nll_sum * share, sum(len(b.ids) for b in micro) * procs.world


# --- the run: evaluation, checkpoints, metrics, report -------------------------------------------------------------
@contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait until the block ends, then act as they would have: a checkpoint is written
    whole, with the bookkeeping that goes with it. (A SIGKILL cannot wait: replace_folder survives it.)"""
    caught = []
    held = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
    for s in dict.fromkeys(caught):
        if callable(held[s]):
            held[s](s, None)  # Python's handler: KeyboardInterrupt
        elif held[s] == signal.SIG_DFL:
            signal.raise_signal(s)


class Run:
    """OUT/ of one run and what outlives a step: the step, the best CIDEr-D so far and the evaluations
    since (--patience); metrics.jsonl, best/, last/ and report.html. Rank 0 evaluates and writes; every
    process learns what it decided (stop or go on) and waits for its saves."""

    def __init__(self, args, procs: Processes, setup: Setup, data: Data, batches: Batches, optimizer,
                 precision: Precision):
        self.args, self.procs, self.setup, self.data = args, procs, setup, data
        self.batches, self.optimizer, self.precision = batches, optimizer, precision
        self.out = Path(args.out)
        self.evaluator = Evaluator(setup.model, setup.tokenizer, batches.collate, batches.batch, batches.workers,
                                   procs.device, precision.autocast)
        self.step, self.best, self.stale = 0, None, 0  # stale: evaluations since the best one
        self.records, self.gallery, self.losses = [], [], []  # losses: (loss, nll) of the steps since the last log
        self.t0, self.paused, self.pairs_seen = time.perf_counter(), 0.0, 0  # paused: evaluating and saving
        self.bar = None

    def start(self):
        """Continue from last/ (--resume) or begin; (re)write metrics.jsonl up to the step it starts at."""
        if self.args.resume:
            state, tensors = load_training_state(self.out / "last")
            restore_optimizer(self.optimizer, state["optimizer"], tensors)
            if state.get("scaler"):
                self.precision.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(tensors["rng.cpu"])
            if self.procs.device.type == "cuda" and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"])
            self.step, self.best, self.stale = state["step"], state["best_cider"], state.get("stale", 0)
            if self.procs.rank:  # dropout streams differ between processes
                torch.manual_seed(self.args.seed * 1000 + self.procs.rank + self.step)
            self.procs.log(f"resuming {self.out} at step {self.step} of {self.batches.total}")
        elif self.procs.rank:
            torch.manual_seed(self.args.seed * 1000 + self.procs.rank)
        if self.procs.master:
            self.out.mkdir(parents=True, exist_ok=True)
            metrics = self.out / "metrics.jsonl"
            if self.args.resume and metrics.exists():  # lines written after the saved step did not happen
                self.records = [r for r in map(json.loads, filter(str.strip, metrics.read_text().splitlines()))
                                if r["step"] <= self.step]
            metrics.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            self.gallery = [thumbnail(row.load()) for row in self.data.val.rows[:GALLERY]]
        self.bar = tqdm(total=self.batches.total, initial=self.step, unit="step", disable=not self.procs.master,
                        file=sys.stderr, dynamic_ncols=True)

    def record(self, entry: dict):
        self.records.append(entry)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def stepped(self, loss: float, nll: float, pairs: int, lr: float):
        """Count a finished step; every --log-every steps (and at the end) record the mean losses."""
        self.step += 1
        self.pairs_seen += pairs
        self.losses.append((loss, nll))
        self.bar.update(1)
        if self.step % self.args.log_every and self.step != self.batches.total:
            return
        mean = self.procs.sum(torch.tensor(self.losses, device=self.procs.device).mean(dim=0)) / self.procs.world
        elapsed = time.perf_counter() - self.t0
        entry = {"type": "train", "step": self.step, "epoch": round(self.step / self.batches.steps_per_epoch, 3),
                 "loss": round(mean[0].item(), 5), "nll": round(mean[1].item(), 5), "lr": lr,
                 "images_per_s": round(self.pairs_seen / (elapsed - self.paused), 2), "elapsed_s": round(elapsed, 1)}
        if self.procs.master:
            self.record(entry)
            self.bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{entry['images_per_s']:.0f}")
        self.losses = []

    def evaluate(self) -> bool:
        """Evaluate this step's weights on the validation set and every --eval-data set (rank 0), record
        it, keep best/, redraw the report. True on every process when --patience has run out."""
        pause, stop = time.perf_counter(), False
        if self.procs.master:
            result = self.evaluator(self.data.val.rows)
            others = {name: self.evaluator(split.rows) for name, split in self.data.extra.items()}
            improved = self.best is None or result["cider"] > self.best or self.data.keep_last
            entry = {"type": "eval", "step": self.step, "epoch": round(self.step / self.batches.steps_per_epoch, 3),
                     **result}
            if others:
                entry["eval_sets"] = {n: {k: v for k, v in r.items() if k != "gallery"} for n, r in others.items()}
            self.record(entry)
            say(f"{f'step {self.step}' if self.step else 'before training'}: {scores_line(result)}"
                + (" (best)" if improved else "") + "".join(f"; {n}: {scores_line(r)}" for n, r in others.items()))
            with signals_held():  # best/ and the best score change together
                if improved:
                    self.save(self.out / "best", evaluation={k: v for k, v in entry.items() if k != "gallery"})
                self.best, self.stale = (result["cider"], 0) if improved else (self.best, self.stale + 1)
            write_report(self.out, self.records, self.gallery)
            stop = 0 < self.args.patience <= self.stale
        self.paused += time.perf_counter() - pause  # evaluation is not training speed
        return self.procs.share(stop)

    def save_last(self, wait: bool = True):
        """Write last/: the weights (or adapters) and the loop state --resume continues from; with `wait`,
        every process waits for it."""
        pause = time.perf_counter()
        if self.procs.master:
            with signals_held():
                self.save(self.out / "last", state=True)
        if wait:
            self.procs.barrier()
        self.paused += time.perf_counter() - pause

    def save(self, folder: Path, state: bool = False, evaluation: dict | None = None):
        """Write a checkpoint folder beside `folder`, then swap it in whole (blip/checkpoint.py)."""
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        if self.setup.adapter is not None:  # the adapters, and the checkpoint they belong to
            save_adapters(self.setup.model, tmp, self.setup.tokenizer, self.setup.adapter)
        else:
            save_model(self.setup.model, tmp, self.setup.tokenizer)
        if evaluation is not None:  # what chose these weights: best/'s evaluation
            save_evaluation(tmp, evaluation)
        if state:
            groups, tensors = optimizer_tensors(self.optimizer)
            tensors["rng.cpu"] = torch.get_rng_state()
            if self.procs.device.type == "cuda":
                tensors["rng.cuda"] = torch.cuda.get_rng_state(self.procs.device)
            settings = {k: v for k, v in vars(self.args).items() if k != "resume"}
            save_training_state(tmp, {"step": self.step, "best_cider": self.best, "stale": self.stale,
                                      "optimizer": groups, "scaler": self.precision.scaler.state_dict(),
                                      "args": settings}, tensors)
        replace_folder(tmp, folder)

    def finish(self, interrupted: bool = False):
        self.bar.close()
        if not self.procs.master:
            return
        if interrupted:
            say(f"interrupted: saved step {self.step} to {self.out / 'last'}; continue with --resume")
            return
        final = next(r for r in reversed(self.records) if r["type"] == "eval")
        say(f"done: {self.step} steps in {time.perf_counter() - self.t0:.0f} s; best CIDEr-D {self.best:.3f}; "
            f"last: {scores_line(final)}")
        say(f"checkpoints: {self.out / 'best'} and {self.out / 'last'}; report: {self.out / 'report.html'}")


def probe_step(model, micro: list[Batch], precision: Precision, device: torch.device) -> tuple[float, float]:
    """One step's forward and backward, timed, and kept nowhere: (seconds a step takes, peak memory in GB: the
    GPU's, or on the CPU the process's). The random streams are put back and the gradients dropped, so that
    the run goes on as it would have without it."""
    cpu_rng, cuda = torch.get_rng_state(), device.type == "cuda"
    cuda_rng = torch.cuda.get_rng_state(device) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        for b in micro:
            with precision.autocast():
                caption_loss(model(b.pixels, b.ids, b.mask, image_embeds=b.image_tokens), b.labels, 0.0).backward()
        if cuda:
            torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        total = torch.cuda.get_device_properties(device).total_memory / 1e9
        raise TrainError(f"a micro-batch of {len(micro[0].ids)} pairs does not fit in the GPU's {total:.0f} GB: add "
                         "--grad-accum 2 (or more), or --grad-checkpointing") from None
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1e3
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(cpu_rng)
    if cuda:
        torch.cuda.set_rng_state(cuda_rng, device)
    return seconds, peak / 1e9


def describe(args, procs: Processes, setup: Setup, data: Data, batches: Batches, precision: Precision,
             probed: tuple[float, float]) -> str:
    """The plan in plain words: what trains, on which pictures, how long and at what rate, what it is
    evaluated on and kept by, and what a step costs here."""
    model, generation, (seconds, peak) = setup.model, setup.config.generation, probed
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = (f"training {trainable / 1e6:.2f} M of {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
            f"parameters{f' (LoRA rank {args.lora})' if args.lora else ''} of {args.init} on {procs.device} "
            f"({precision.amp if precision.amp != 'off' else 'fp32'})")
    pictures = (f"{batches.n_train} captions of {len(data.train.rows)} pictures in {args.data}"
                + (f", and {batches.n_replay} of {len(data.replay.rows)} replayed ({batches.replayed} a step)"
                   if batches.n_replay else ""))
    passes = batches.total * (batches.batch - batches.replayed) / batches.n_train
    steps = (f"{batches.total} steps of {batches.batch} pairs ({passes:.0f} passes"
             f"{', the budget of a small set: blip/tool/plan.py' if setup.small else ''}), "
             f"learning rate {args.lr:.3g} (the ViT at {args.vision_lr_scale:g} of it), augment {args.augment}"
             + (f", text dropout {args.dropout:g}" if args.dropout else ""))
    if data.keep_last:
        judged = (f"evaluated on the training pictures themselves (fewer than {HANDFUL}: none held out), "
                  "the last weights kept")
    else:
        judged = (f"evaluated every {args.eval_every or batches.steps_per_epoch} steps on {len(data.val.rows)} "
                  "held-out pictures, the best kept in best/"
                  + (f", stopping after {args.patience} evaluations without a better CIDEr-D" if args.patience else ""))
    hint = ""
    if procs.device.type == "cuda" and peak > 0.85 * torch.cuda.get_device_properties(procs.device).total_memory / 1e9:
        hint = f" (near the GPU's memory: --grad-accum {2 * args.grad_accum} halves what a step holds)"
    total = batches.total * seconds
    how_long = f"{total:.0f} s" if total < 120 else f"{total / 60:.0f} min" if total < 7200 else f"{total / 3600:.1f} h"
    cost = (f"a step takes about {seconds:.2g} s here: about {how_long} of training (evaluations aside); peak memory "
            f"about {peak:.1f} GB{hint}")
    shortest, longest = setup.caption_tokens
    lengths = (f"captions of {shortest}-{longest} tokens, evaluated with beam {generation.num_beams} and "
               f"{generation.min_new_tokens}-{generation.max_new_tokens} new tokens; writing to {args.out}")
    return "\n  ".join(["plan: " + what, pictures, steps, judged, cost, lengths])


# --- the loop ------------------------------------------------------------------------------------------------------
def train_loop(run: Run, model, steps, optimizer, precision: Precision, args, procs: Processes) -> int:
    """Evaluate where training starts (the "before" of every curve), then step until the schedule ends or
    --patience runs out, evaluating and saving as the flags say. `steps` yields each step's micro-batches.
    Ctrl-C or SIGTERM saves last/ and ends the run (exit code 130): --resume continues it."""
    total = run.batches.total
    eval_every = args.eval_every or run.batches.steps_per_epoch
    save_every = args.save_every or eval_every
    on_int = signal.getsignal(signal.SIGINT)
    on_term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a polite kill saves last/, like Ctrl-C
    try:
        if not args.resume:
            run.evaluate()
        while run.step < total:
            lr = lr_at(run.step, total, args.lr, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            run.stepped(*train_step(model, next(steps), optimizer, precision, args, procs), lr)
            if (run.step % eval_every == 0 or run.step == total) and run.evaluate():
                procs.log(f"--patience {args.patience}: no better CIDEr-D in {args.patience} evaluations; stopping at "
                          f"step {run.step} (best: {run.out / 'best'})")
                total = run.step  # the run ends here: last/ is saved as at the end
            if run.step % save_every == 0 or run.step == total:
                run.save_last()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the save short
        if run.step > 0:
            run.save_last(wait=False)  # the other processes may be stopping anywhere
        run.finish(interrupted=run.step > 0)
        return 130
    finally:
        signal.signal(signal.SIGINT, on_int)
        signal.signal(signal.SIGTERM, on_term)
    run.finish()
    return 0


def main(argv=None) -> int:
    procs = None
    try:
        args = parse_args(argv)
        procs = start_processes(args)
        claim_output(args)
        data = read_data(args, procs)
        setup = build_model(args, procs, data)
        batches = Batches(args, procs, setup, data)
        # fused: one kernel for all of a step's updates, on CPU as on CUDA (4-5x PyTorch's per-tensor loop on CPU)
        optimizer = torch.optim.AdamW(param_groups(setup.model, args.weight_decay, args.vision_lr_scale),
                                      lr=args.lr, betas=(0.9, 0.999), fused=True)
        precision = pick_precision(args, setup.model, procs.device)
        cache_image_tokens(args, procs, setup, batches, precision)
        run = Run(args, procs, setup, data, batches, optimizer, precision)
        run.start()
        model = torch.compile(setup.model) if args.compile else setup.model
        if procs.distributed:
            ids = [procs.device.index] if procs.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        steps = batches.from_step(run.step)
        first = next(steps)  # measured once here, then trained on
        procs.log(describe(args, procs, setup, data, batches, precision,
                           probe_step(setup.model, first, precision, procs.device)))
        code = train_loop(run, model, itertools.chain([first], steps), optimizer, precision, args, procs)
        if code == 0 and args.blend is not None and procs.master:
            blend_run(Path(args.init), run.out / "best", data.val.rows, {n: s.rows for n, s in data.extra.items()},
                      list(ALPHAS), args.blend, None, run.out / "blend", batches.batch, say)
        return code
    except TrainError as e:
        if int(os.environ.get("RANK", 0)) == 0:  # every process stops; one says why
            say(f"error: {e}")
        return 1
    finally:
        if procs is not None:
            procs.close()


if __name__ == "__main__":
    sys.exit(main())
