"""Fine-tune BLIP's captioner on a folder of captioned images, or train one from scratch.

    python train.py --data ./football                                # from checkpoints/blip-base
    python train.py --data data/shapes --init scratch --preset tiny --epochs 40
    python train.py --data ./football --out runs/football --resume   # after a crash or a kill
    python train.py --data ./mine --lora 16                          # adapters only: small checkpoints, less memory
    python train.py --data ./mine --freeze-vision --cache-image-tokens --augment flip   # the ViT run once per picture
    torchrun --nproc_per_node 4 train.py --data ./coco               # several GPUs (or CPU processes)

One flat script, top to bottom: arguments, processes, data (checked whole before anything is
written), model and tokenizer, optimizer and schedule, resume, evaluation, the loop. OUT/last/ and
OUT/best/ are checkpoint folders that caption.py --checkpoint takes as they are; OUT/last/ also
holds the loop state that --resume continues from. OUT/metrics.jsonl has a line per log and per
evaluation, OUT/report.html shows them. With --lora, last/ and best/ hold the adapters alone and name
the checkpoint they belong to (blip/lora.py); `convert_weights.py --merge-lora` makes a full folder of them.

Checkpoints carry their decoding defaults (config.json "generation"): the evaluation's beams, and caption
lengths that fit the training captions (the longest plus a quarter, at least BLIP's 20 new tokens), which
caption.py and Captioner then use.

--batch-size is the number of (image, caption) pairs of one optimizer step, however many processes
(torchrun) and micro-batches (--grad-accum) it is split into: the loss is the mean over the caption
tokens of the whole batch, so splitting changes memory and speed, not the result.
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

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
    save_model,
    save_training_state,
    weights_sha256,
)
from blip.config import GenerationConfig
from blip.decoding import DecodeConfig, generate_from
from blip.lora import ATTENTION as LORA_TARGETS
from blip.lora import LoraConfig, adapters, add_lora, merge_lora, parse_targets
from blip.model import BlipCaptioner, caption_labels, caption_loss
from blip.speed import recompute
from blip.speed.memory import keep_freed_memory
from blip.tokenizer import Tokenizer
from blip.tool.captioner import cpu_has_bf16
from blip.tool.data import (
    MAX_WORDS,
    Collate,
    DataError,
    EvalSet,
    TrainSet,
    check_images,
    clean_caption,
    epoch_order,
    read_eval_set,
    read_splits,
)
from blip.tool.metrics import caption_scores
from blip.tool.report import thumbnail, write_report
from blip.tool.token_cache import ImageTokens

DEFAULT_INIT = "checkpoints/blip-base"
# defaults that depend on where the weights come from: BLIP's fine-tuning recipe for pretrained
# weights; for random weights, what the shapes demo measured (docs/training.md, From scratch):
# a ViT trained at the decoder's rate, or on cropped pictures, learns colour and place but not shape
RECIPE = {
    "pretrained": {"lr": 1e-5, "vision_lr_scale": 1.0, "augment": "blip"},
    "scratch": {"lr": 2e-3, "vision_lr_scale": 0.1, "augment": "flip"},
}
GALLERY = 8  # validation images shown per evaluation in report.html
CPU_BF16_MIN_PARAMS = 100_000_000  # --amp auto on CPU: bf16 pays once matrix products dominate (docs/training.md)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--data", metavar="DIR", help="data folder: metadata.jsonl/csv, COCO .json, parquet snapshot or .txt sidecars;\n"
      "train/ and val/ sub-folders are the splits when present")
    a("--out", metavar="DIR", help="where checkpoints, metrics.jsonl and report.html go (default: runs/<data name>)")
    a("--init", default=DEFAULT_INIT, metavar="DIR",
      help=f"checkpoint folder to fine-tune (default: {DEFAULT_INIT}), or 'scratch' for random weights")
    a("--preset", choices=list(presets.PRESETS), default="tiny", help="model size with --init scratch (default: tiny)")
    a("--tokenizer", metavar="FILE", help="with --init scratch: tokenizer.json or vocab.txt; default: a WordPiece\n"
      "vocabulary trained on the data's captions")
    a("--vocab-size", type=int, default=1000, help="size of that trained vocabulary (default: 1000)")
    a("--epochs", type=int, default=5, help="passes over the training captions (default: 5, as BLIP on COCO)")
    a("--max-steps", type=int, help="stop after this many optimizer steps (the schedule ends there too)")
    a("--batch-size", type=int, default=32, help="(image, caption) pairs per optimizer step, all processes\n"
      "together (default: 32)")
    a("--grad-accum", type=int, default=1, help="split each batch into this many micro-batches, to save memory")
    a("--lr", type=float, help=f"peak learning rate (default: {RECIPE['pretrained']['lr']:g} fine-tuning, "
      f"{RECIPE['scratch']['lr']:g} from scratch)")
    a("--vision-lr-scale", type=float, help="the ViT learns at lr times this (default: 1 fine-tuning, 0.1 from "
      "scratch)")
    a("--weight-decay", type=float, default=0.05, help="AdamW weight decay, not on norms, biases, embeddings "
      "(default: 0.05)")
    a("--warmup", type=float, default=0.05, help="fraction of the steps with a linear warm-up; cosine decay to 0\n"
      "after it (default: 0.05)")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off; default: 1.0)")
    a("--label-smoothing", type=float, default=0.1, help="label smoothing of the loss (default: 0.1, as BLIP)")
    a("--dropout", type=float, default=0.0, help="text dropout (default: 0, as HF's checkpoints; the original\n"
      "BLIP trained with 0.1)")
    a("--prompt", default="a picture of ", help="text every caption starts with; not a target of the loss\n"
      "(default: 'a picture of ')")
    a("--augment", choices=["blip", "flip", "none"],
      help="blip: random resized crop, flip, RandAugment (default fine-tuning); flip: flips only\n"
      "(default from scratch); none")
    a("--freeze-vision", action="store_true", help="train the text decoder only; the ViT stays as loaded")
    a("--cache-image-tokens", action="store_true",
      help="with --freeze-vision: compute each picture's image tokens once per view (as it is, and\n"
      "mirrored with --augment flip) into OUT/image_tokens/, and train the decoder on them\n"
      "(needs --augment flip or none: random crops cannot be computed ahead)")
    a("--lora", type=int, metavar="RANK", help="train low-rank adapters of this rank instead of the weights\n"
      "(blip/lora.py); OUT/last/ and OUT/best/ then hold the adapters alone")
    a("--lora-alpha", type=float, help="adapter scale alpha / rank (default: alpha = 2 x rank)")
    a("--lora-targets", metavar="NAMES", help=f"comma-separated layer names to adapt; 'text.' or 'vision.' "
      f"before a name\nlimits it to one tower (default: {','.join(LORA_TARGETS)})")
    a("--grad-checkpointing", nargs="?", const="full", default="auto", choices=["auto", *recompute.MODES],
      help="what backward recomputes instead of keeping (blip/speed/recompute.py). full (the flag alone):\n"
      "whole blocks, the least memory, ~1/3 more compute; elementwise: norms, GELU and adds, the\n"
      "same gradients, ~400 MB less for base at batch 4; none; auto (default): elementwise on CPU\n"
      "for models of 100 M parameters or more, else none")
    a("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
      help="mixed precision; auto: bf16 on CUDA GPUs that have it, else fp16 with a\n"
      "gradient scaler; on CPU, bf16 for base-size models and larger where the CPU has\n"
      "AVX-512 BF16 or AMX (measured 2x fp32), else off (fp32)")
    a("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    a("--workers", type=int, help="data-loading processes (default: 0 on CPU, 6 on CUDA)")
    a("--seed", type=int, default=0, help="seed for initialisation, data order, augmentation and the split")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when available")
    a("--val-fraction", type=float, default=0.1, help="without a val/ split: fraction of images held out "
      "(default: 0.1)")
    a("--eval-every", type=int, default=0, help="evaluate every N steps (default: 0, at the end of every epoch)")
    a("--save-every", type=int, default=0, help="write OUT/last/ every N steps (default: 0, with every evaluation)")
    a("--log-every", type=int, default=10, help="write a metrics line every N steps (default: 10)")
    a("--num-beams", type=int, default=3, help="beam width of the evaluation captions, saved as the checkpoint's\n"
      "default (default: 3)")
    a("--max-new-tokens", type=int, metavar="N", help="longest evaluation caption in tokens, saved as the\n"
      "checkpoint's default (default: the longest training caption plus a quarter, at least 20)")
    a("--min-new-tokens", type=int, metavar="N", help="shortest evaluation caption in tokens, saved likewise\n"
      "(default: 5, or the shortest training caption's length when shorter)")
    a("--eval-data", action="append", metavar="DIR", default=[],
      help="another validation set (its val/ split, or the whole folder), evaluated with\n"
      "the first; its metrics go into metrics.jsonl and report.html (repeatable: forgetting shows)")
    a("--patience", type=int, default=0, metavar="N", help="stop after N evaluations without a better CIDEr-D\n"
      "(best/ keeps the best; default: 0, never)")
    a("--resume", action="store_true", help="continue the run in --out from OUT/last/ with its saved settings;\n"
      "flags given now override them")
    a("--skip-bad", action="store_true", help="train on the good rows when some are bad, instead of stopping")
    args = p.parse_args(argv)
    if args.resume:  # the saved settings become the defaults; flags on the command line still win
        if args.out is None:
            p.error("--resume needs --out, the folder of the run to continue")
        try:
            saved, _ = load_training_state(recover_and_path(Path(args.out)))
        except CheckpointError as e:
            p.error(f"nothing to resume in {args.out}: {e}")
        if isinstance(saved["args"].get("grad_checkpointing"), bool):  # runs saved when the flag was on/off
            saved["args"]["grad_checkpointing"] = "full" if saved["args"]["grad_checkpointing"] else "auto"
        p.set_defaults(**saved["args"])
        args = p.parse_args(argv)
        args.resume = True
    if args.data is None:
        p.error("--data is required")
    for name, value in RECIPE["scratch" if args.init == "scratch" else "pretrained"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = str(Path("runs") / Path(args.data).resolve().name)
    for name in ("epochs", "batch_size", "grad_accum", "num_beams", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_new_tokens", "lora"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.min_new_tokens is not None and args.min_new_tokens < 0 or args.patience < 0:
        p.error("--min-new-tokens and --patience must not be negative")
    if args.cache_image_tokens and not args.freeze_vision:
        p.error("--cache-image-tokens needs --freeze-vision: tokens of a ViT that learns change every step")
    if args.cache_image_tokens and args.augment == "blip":
        p.error("--cache-image-tokens cannot cache random crops (--augment blip): add --augment flip or none")
    if (args.lora_alpha is not None or args.lora_targets) and not args.lora:
        p.error("--lora-alpha and --lora-targets need --lora RANK")
    if args.lora and args.grad_checkpointing == "elementwise":
        p.error("--lora updates layer outputs in place, which --grad-checkpointing elementwise keeps: use none "
                "(the default with --lora) or full")
    if args.lora:
        args.lora_alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora
        try:
            targets = parse_targets(args.lora_targets or ",".join(LORA_TARGETS))
        except ValueError as e:
            p.error(f"--lora-targets: {e}")
        if args.freeze_vision:  # the ViT stays as loaded: adapters on the text decoder only
            targets = tuple(dict.fromkeys(t if t.startswith("text.") else f"text.{t.split('.')[-1]}" for t in targets))
        args.lora_targets = ",".join(targets)
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be at least 1")
    if not 0 <= args.warmup < 1 or not 0 <= args.label_smoothing < 1 or not 0 <= args.dropout < 1:
        p.error("--warmup, --label-smoothing and --dropout must be in [0, 1)")
    return args


def recover_and_path(out: Path) -> Path:
    recover_folder(out / "last")
    return out / "last"


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`: linear warm-up over the first
    `warmup` fraction of the steps, then cosine decay to 0."""
    warm = math.ceil(warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


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


def split_batch(items: list, parts: int) -> list[list]:
    """Cut a batch into `parts` contiguous pieces whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(parts)]


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


def eval_set_names(folders: list[str]) -> dict[str, str]:
    """--eval-data folders by the name their metrics take: the folder's name (its parent's, for a
    val/ folder), numbered when two are the same."""
    names = {}
    for folder in folders:
        path = Path(folder).resolve()
        name = path.parent.name if path.name in ("val", "validation", "valid") else path.name
        names[name if name not in names else f"{name}-{len(names) + 1}"] = folder
    return names


def say(message: str):
    tqdm.write(message, file=sys.stderr)


def scores_line(result: dict) -> str:
    return (f"val loss {result['val_loss']:.3f}, BLEU-4 {result['bleu4']:.3f}, CIDEr-D {result['cider']:.3f}, "
            f"exact {result['exact']:.1%}")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)

    # --- processes -------------------------------------------------------------------------------
    keep_freed_memory()  # fewer page faults per step (blip/speed/memory.py)
    distributed = "RANK" in os.environ  # started by torchrun
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was asked for, but no CUDA GPU is available", file=sys.stderr)
        return 1
    rank, world = 0, 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    master = rank == 0
    log = say if master else (lambda _: None)

    def fail(message: str) -> int:
        log(f"error: {message}")
        if distributed:
            dist.destroy_process_group()
        return 1

    # --- data: read and check everything before anything is written --------------------------------
    if (out / "last").exists() and not args.resume:
        return fail(f"{out} already holds a run: add --resume to continue it, or choose another --out")
    try:
        train_split, val_split = read_splits(args.data, args.val_fraction, args.seed)
        extra = {name: read_eval_set(d) for name, d in eval_set_names(args.eval_data).items()}  # --eval-data
    except DataError as e:
        return fail(str(e))
    n_images = len(train_split.rows) + len(val_split.rows) + sum(len(s.rows) for s in extra.values())
    with tqdm(total=n_images, desc="checking images", unit="image", disable=not master or n_images < 100,
              file=sys.stderr) as bar:
        train_split, val_split = check_images(train_split, bar), check_images(val_split, bar)
        extra = {name: check_images(split, bar) for name, split in extra.items()}
    problems = train_split.problems + val_split.problems + [p for s in extra.values() for p in s.problems]
    if problems:
        for problem in problems:
            log(f"bad row: {problem}")
        if not args.skip_bad:
            return fail(f"{len(problems)} bad row(s) in {args.data} (listed above); fix them, or pass --skip-bad "
                        "to train on the rest")
        log(f"--skip-bad: dropped {len(problems)} bad row(s), training on the rest")
    if not train_split.rows or not val_split.rows:
        return fail(f"{args.data}: need at least one training and one validation image, "
                    f"have {len(train_split.rows)} and {len(val_split.rows)}")
    empty = [name for name, split in extra.items() if not split.rows]
    if empty:
        return fail(f"--eval-data {empty[0]}: no images to evaluate on")

    # --- tokenizer and model -----------------------------------------------------------------------
    last = out / "last"
    try:
        if args.resume:
            tokenizer = load_tokenizer(last)
            config = read_config(last)
            init = last
        elif args.init == "scratch":
            if args.tokenizer:
                tokenizer = Tokenizer.from_file(args.tokenizer)
            else:  # trained once, on rank 0, and shared, so every process has the same vocabulary
                texts = [args.prompt] + [clean_caption(c) for r in train_split.rows for c in r.captions]
                blob = [Tokenizer.train(texts, args.vocab_size).to_str() if master else None]
                if distributed:
                    dist.broadcast_object_list(blob, src=0)
                tokenizer = Tokenizer.from_str(blob[0])
            config = presets.with_tokenizer(presets.PRESETS[args.preset](), tokenizer)
            init = None
        else:
            if not Path(args.init).is_dir():
                return fail(f"no checkpoint folder at {args.init}; make one with `python convert_weights.py "
                            f"Salesforce/blip-image-captioning-base {args.init}` (docs/checkpoints.md), "
                            "or train from random weights with --init scratch")
            tokenizer = load_tokenizer(args.init)
            config = read_config(args.init)
            init = Path(args.init)
    except (CheckpointError, ValueError, OSError) as e:
        return fail(str(e))
    # caption lengths from the data: training keeps whole captions, evaluation and the checkpoint's
    # decoding defaults leave room for the longest (docs/training.md: caption lengths)
    prompt_length = len(tokenizer.tokens(args.prompt))
    room = config.text.max_positions - 1 - prompt_length  # new tokens that fit after [DEC] and the prompt
    if room < 2:
        return fail(f"the prompt {args.prompt!r} leaves no room in the model's {config.text.max_positions} positions")
    shortest, longest = caption_lengths(train_split.rows, tokenizer)
    everything = [train_split, val_split, *extra.values()]
    max_tokens = 1 + prompt_length + min(room, max(caption_lengths(s.rows, tokenizer)[1] for s in everything))
    generation = fit_generation(shortest, longest, room, args)
    config = replace(config, text=replace(config.text, dropout=args.dropout), generation=generation,
                     label_smoothing=args.label_smoothing, prompt=args.prompt)
    torch.manual_seed(args.seed)
    try:
        model = BlipCaptioner(config) if init is None else BlipCaptioner.from_pretrained(init, config=config)
    except (CheckpointError, ValueError) as e:
        return fail(str(e))
    adapter = None  # with --lora: adapter.json of the run's folders (blip/checkpoint.py)
    if args.lora:
        if args.resume:  # last/ holds the adapters, loaded onto their base
            adapter = read_adapter(last)
        elif init is None:
            return fail("--lora adapts a trained checkpoint: give one with --init, not scratch")
        elif adapters(model):
            return fail(f"{init} holds LoRA adapters: make a full checkpoint of it first with "
                        f"`python convert_weights.py --merge-lora {init} MERGED`, and train from MERGED")
        else:
            lora = LoraConfig(args.lora, args.lora_alpha, tuple(args.lora_targets.split(",")))
            add_lora(model, lora)
            adapter = {"base": str(init.resolve()), "base_sha256": weights_sha256(init), "lora": lora.to_dict()}
    elif adapters(model):  # a LoRA run's folder as --init: its adapters become weights, then all of them train
        merge_lora(model)
    model.to(device).train()
    if args.freeze_vision:
        model.visual_encoder.requires_grad_(False)
    model.set_recompute(recompute.pick_mode(args.grad_checkpointing, model, device))
    size = config.vision.image_size

    # --- batches: the epoch order and every augmentation are fixed by the seed ----------------------
    train_set = TrainSet(train_split.rows, size, args.prompt, args.augment, cached=args.cache_image_tokens)
    batch = min(args.batch_size, len(train_set))
    if batch < args.grad_accum * world:
        return fail(f"a batch of {batch} pairs cannot be split into {args.grad_accum} micro-batches on {world} "
                    "process(es)")
    steps_per_epoch = len(train_set) // batch
    total = args.epochs * steps_per_epoch if args.max_steps is None else args.max_steps
    collate = Collate(tokenizer, max_tokens)
    workers = args.workers if args.workers is not None else (6 if device.type == "cuda" else 0)

    def batches_from(step: int):
        """This process's micro-batches from optimizer step `step` on: lists of (pair, seed)."""
        epoch = step // steps_per_epoch
        while True:
            order = epoch_order(len(train_set), epoch, args.seed)
            for b in range(step - epoch * steps_per_epoch, steps_per_epoch):
                for micro in split_batch(order[b * batch : (b + 1) * batch], args.grad_accum):
                    yield split_batch(micro, world)[rank]
            epoch, step = epoch + 1, (epoch + 1) * steps_per_epoch

    # --- optimizer, schedule, precision --------------------------------------------------------------
    peak_lr = args.lr
    # fused: one kernel for all of a step's updates, on CPU as on CUDA (4-5x PyTorch's per-tensor loop on CPU)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, args.vision_lr_scale), lr=peak_lr,
                                  betas=(0.9, 0.999), fused=True)
    amp = args.amp
    if amp == "auto" and device.type == "cuda":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif amp == "auto":  # bf16 autocast: 2x fp32 for the base model on such CPUs, 0.8x for the tiny one
        big = sum(p.numel() for p in model.parameters()) >= CPU_BF16_MIN_PARAMS
        amp = "bf16" if big and cpu_has_bf16() else "off"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    # --- cached image tokens: the frozen ViT run once per picture and view ------------------------------
    image_tokens = None
    if args.cache_image_tokens:
        n_views = len(train_split.rows) * train_set.transform.views
        with tqdm(total=n_views, desc="image tokens", unit="view", disable=not master, file=sys.stderr) as bar:
            # rank 0 writes the file, the others wait for it and read it
            if master:
                image_tokens = ImageTokens.open_or_build(out / "image_tokens", model.visual_encoder, train_split.rows,
                                                         train_set.transform, batch, autocast, bar)
            if distributed:
                dist.barrier()
            if not master:
                image_tokens = ImageTokens.open_or_build(out / "image_tokens", model.visual_encoder, train_split.rows,
                                                         train_set.transform, batch, autocast)

    # --- resume -------------------------------------------------------------------------------------
    step, best, stale = 0, None, 0  # stale: evaluations since the best one (--patience)
    if args.resume:
        state, tensors = load_training_state(last)
        restore_optimizer(optimizer, state["optimizer"], tensors)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(tensors["rng.cpu"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        if rank:  # dropout streams differ between processes
            torch.manual_seed(args.seed * 1000 + rank + state["step"])
        step, best, stale = state["step"], state["best_cider"], state.get("stale", 0)
        log(f"resuming {out} at step {step} of {total}")
    elif rank:
        torch.manual_seed(args.seed * 1000 + rank)
    ddp = model
    if args.compile:
        ddp = torch.compile(ddp)
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(ddp, device_ids=ids)

    # --- output ---------------------------------------------------------------------------------------
    records = []
    if master:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path = out / "metrics.jsonl"
        if args.resume and metrics_path.exists():  # lines written after the saved step did not happen
            records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            records = [r for r in records if r["step"] <= step]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        gallery = [thumbnail(row.load()) for row in val_split.rows[:GALLERY]]

    def record(entry: dict):
        records.append(entry)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def save(folder: Path, with_state: bool):
        """Write a checkpoint folder next to `folder`, then swap it in whole."""
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        if adapter is not None:  # the adapters, and the checkpoint they belong to
            save_adapters(model, tmp, tokenizer, adapter)
        else:
            save_model(model, tmp, tokenizer)
        if with_state:
            groups, tensors = optimizer_tensors(optimizer)
            tensors["rng.cpu"] = torch.get_rng_state()
            if device.type == "cuda":
                tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
            state = {"step": step, "best_cider": best, "stale": stale, "optimizer": groups,
                     "scaler": scaler.state_dict(),
                     "args": {k: v for k, v in vars(args).items() if k != "resume"}}
            save_training_state(tmp, state, tensors)
        replace_folder(tmp, folder)

    # --- evaluation (rank 0) --------------------------------------------------------------------------
    eval_decode = DecodeConfig(**asdict(config.generation))  # what the checkpoint will say to caption.py

    @torch.no_grad()
    def evaluate(rows) -> dict:
        model.eval()
        loader = torch.utils.data.DataLoader(EvalSet(rows, size, args.prompt), batch_size=batch, collate_fn=collate,
                                             num_workers=workers, generator=torch.Generator())  # global stream kept
        loss_sum, n_tokens, predictions = 0.0, 0, []
        prompt_ids = tokenizer.encode_prompt(args.prompt)
        for pixels, ids, mask in loader:
            pixels, ids, mask = pixels.to(device), ids.to(device), mask.to(device)
            with autocast():
                image = model.encode_image(pixels)  # once, for the loss and for the captions
                labels = caption_labels(ids, mask, prompt_length, config.text.bos_token_id)
                loss_sum += caption_loss(model.text_decoder(ids, mask, image), labels, 0.0, "sum").item()
                n_tokens += int((labels[:, 1:] != -100).sum())
                new = generate_from(model, image, prompt_ids, eval_decode)
            predictions += [tokenizer.decode(i) for i in new]
        model.train()
        references = [row.captions for row in rows]
        scores = caption_scores(predictions, references)
        shown = [{"prediction": p, "references": r} for p, r in zip(predictions[:GALLERY], references, strict=False)]
        return {"val_loss": loss_sum / max(1, n_tokens), **scores, "gallery": shown}

    # --- the loop --------------------------------------------------------------------------------------
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"training {trainable / 1e6:.2f} M of {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters"
        f"{f' (LoRA rank {args.lora})' if args.lora else ''} on {device} ({amp}), {len(train_set)} pairs from "
        f"{len(train_split.rows)} images, {len(val_split.rows)} held out; "
        f"{total} steps of {batch} pairs, lr {peak_lr:g} (ViT x{args.vision_lr_scale:g}), augment {args.augment}; "
        f"captions of {shortest}-{longest} tokens (evaluated with beam {generation.num_beams}, "
        f"{generation.min_new_tokens}-{generation.max_new_tokens} new tokens); writing to {out}")
    eval_every = args.eval_every or steps_per_epoch
    save_every = args.save_every or eval_every
    loader = iter(torch.utils.data.DataLoader(train_set, batch_sampler=batches_from(step), collate_fn=collate,
                                              num_workers=workers, pin_memory=device.type == "cuda",
                                              generator=torch.Generator()))  # the global stream is dropout's
    def evaluation():
        """Evaluate at `step` (and every --eval-data set), record it, keep `best/`, redraw the report."""
        nonlocal best, stale
        result = evaluate(val_split.rows)
        others = {name: evaluate(split.rows) for name, split in extra.items()}
        improved = best is None or result["cider"] > best
        best, stale = (result["cider"], 0) if improved else (best, stale + 1)
        entry = {"type": "eval", "step": step, "epoch": round(step / steps_per_epoch, 3), **result}
        if others:
            entry["eval_sets"] = {name: {k: v for k, v in r.items() if k != "gallery"} for name, r in others.items()}
        record(entry)
        say(f"{f'step {step}' if step else 'before training'}: {scores_line(result)}" + (" (best)" if improved else "")
            + "".join(f"; {name}: {scores_line(r)}" for name, r in others.items()))
        if improved:
            save(out / "best", with_state=False)
        write_report(out, records, gallery)

    if master and not args.resume:  # where training starts from: the "before" of every curve
        evaluation()
    if distributed and not args.resume:
        dist.barrier()
    bar = tqdm(total=total, initial=step, unit="step", disable=not master, file=sys.stderr, dynamic_ncols=True)
    t0, paused, images_seen, loss_window = time.perf_counter(), 0.0, 0, []
    on_term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a polite kill saves last/, like Ctrl-C
    try:
        while step < total:
            lr = lr_at(step, total, peak_lr, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            micro = [next(loader) for _ in range(args.grad_accum)]
            labels = [caption_labels(ids, mask, prompt_length, config.text.bos_token_id) for _, ids, mask in micro]
            # the mean over every caption token of the whole batch, whichever process holds it
            n_tokens = torch.tensor(float(sum(int((lab[:, 1:] != -100).sum()) for lab in labels)), device=device)
            if distributed:
                dist.all_reduce(n_tokens)
            loss_sum = nll_sum = 0.0
            for i, ((images, ids, mask), lab) in enumerate(zip(micro, labels, strict=True)):
                if image_tokens is not None:  # the batch names views of the cache: their tokens, not pixels
                    images = image_tokens[images]
                images, ids, mask, lab = (t.to(device, non_blocking=True) for t in (images, ids, mask, lab))
                sync = ddp.no_sync() if distributed and i < len(micro) - 1 else nullcontext()
                with sync, autocast():
                    if image_tokens is not None:
                        logits = ddp(None, ids, mask, image_embeds=images)
                    else:
                        logits = ddp(images, ids, mask)
                    loss = caption_loss(logits, lab, args.label_smoothing, "sum")
                scaler.scale(loss * world / n_tokens).backward()
                loss_sum += loss.item()
                # the same loss without label smoothing: what validation reports, so the curves compare
                nll = caption_loss(logits.detach(), lab, 0.0, "sum") if args.label_smoothing else loss
                nll_sum += nll.item()
                images_seen += len(images) * world
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            share = world / n_tokens.item()  # this process's share of the batch's mean, rescaled
            loss_window.append((loss_sum * share, nll_sum * share))
            bar.update(1)

            if step % args.log_every == 0 or step == total:
                mean = torch.tensor(loss_window, device=device).mean(dim=0)  # (loss, nll)
                if distributed:
                    dist.all_reduce(mean)
                    mean /= world
                elapsed = time.perf_counter() - t0
                entry = {"type": "train", "step": step, "epoch": round(step / steps_per_epoch, 3),
                         "loss": round(mean[0].item(), 5), "nll": round(mean[1].item(), 5), "lr": lr,
                         "images_per_s": round(images_seen / (elapsed - paused), 2), "elapsed_s": round(elapsed, 1)}
                if master:
                    record(entry)
                    bar.set_postfix(loss=f"{entry['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{entry['images_per_s']:.0f}")
                loss_window = []
            evaluating = step % eval_every == 0 or step == total
            pause = time.perf_counter()
            if master and evaluating:
                evaluation()
            patience_out = torch.tensor(int(evaluating and 0 < args.patience <= stale), device=device)
            if distributed and evaluating:  # rank 0 evaluated: every process stops with it
                dist.broadcast(patience_out, src=0)
            if patience_out:
                total = step  # the run ends here: last/ is saved as at the end
            if master and (step % save_every == 0 or step == total):
                save(last, with_state=True)
            if distributed and (evaluating or step % save_every == 0):
                dist.barrier()
            paused += time.perf_counter() - pause  # evaluation and saving are not training speed
            if patience_out:
                log(f"--patience {args.patience}: no better CIDEr-D in {args.patience} evaluations; stopping at step "
                    f"{step} (best: {out / 'best'})")
    except KeyboardInterrupt:
        if master and step > 0:
            save(last, with_state=True)
            say(f"interrupted: saved step {step} to {last}; continue with --resume")
        return 130
    finally:
        signal.signal(signal.SIGTERM, on_term)
        bar.close()
        if distributed:
            dist.destroy_process_group()
    if master:
        final = next(r for r in reversed(records) if r["type"] == "eval")
        say(f"done: {step} steps in {time.perf_counter() - t0:.0f} s; best CIDEr-D {best:.3f}; "
            f"last: {scores_line(final)}")
        say(f"checkpoints: {out / 'best'} and {last}; report: {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
