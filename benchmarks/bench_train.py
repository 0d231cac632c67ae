"""Fine-tuning step speed and peak memory, ours vs HF `BlipForConditionalGeneration`, same weights, same optimizer.

    python benchmarks/bench_train.py [--size base] [--batch 4] [--threads 2] [--repeats 5] [--amp fp32 bf16]
                                     [--device cpu] [--modes full freeze-vision cached lora]
                                     [--lora-rank 16] [--lora-targets qkv,proj,...]

One step = forward, BLIP's captioning loss, backward, AdamW step over the trainable parameters (lr 1e-5,
weight decay 0.05, fused, as train.py makes it; the same optimizer on both sides). The fine-tuning modes,
each as train.py runs it:

  full           every weight trains (train.py's default).
  freeze-vision  the ViT's weights are frozen, the text decoder trains; the ViT still runs forward every
                 step (train.py --freeze-vision).
  cached         the decoder trains on image tokens the frozen ViT made once (train.py --freeze-vision
                 --cache-image-tokens): a step reads the batch's tokens from a memory-mapped file (the
                 copy included, blip/tool/token_cache.py) and runs the decoder alone. Making the tokens, once
                 per picture, is not in it.
  lora           low-rank adapters of rank --lora-rank (alpha = 2 x rank) on the --lora-targets layers
                 train, nothing else (train.py --lora, blip/lora.py).

HF runs full (`model(..., labels=labels).loss`) and lora through peft (`get_peft_model`, the same layers
under HF's names, the same rank, alpha and trainable-parameter count: checked). Ours runs the step the way
train.py does (loss summed over caption tokens, divided by their count; what backward recomputes as
train.py's default for the device, blip/speed/recompute.py).

Speed: median of --repeats steps after a warm-up step, every mode of both sides alternated in one process
(machines drift), whose malloc keeps freed memory for the next step as train.py's does (blip/speed/memory.py;
--default-malloc leaves glibc's settings). Peak memory: each side and mode alone in a child process, the
peak RSS of two steps (counted from just before the first: Linux's resettable VmHWM), or the peak CUDA
allocation on a GPU; weights, gradients, AdamW moments and activations are all in it. Each precision's
table ends with the targets the fine-tuning modes must meet, PASS or FAIL in this run.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from common import add_common_args, alternate, apply_common_args, same_weights

from blip import BlipCaptioner
from blip.lora import DEFAULT, LoraConfig, add_lora, add_token_rows, lora_state_dict, parse_targets
from blip.lora import TARGETS as LORA_TARGETS
from blip.model import caption_labels, caption_loss
from blip.speed.memory import keep_freed_memory
from blip.speed.recompute import MODES, pick_mode
from blip.tool.captioner import cpu_has_bf16
from blip.tool.token_cache import ImageTokens

HERE = Path(__file__).resolve()


def make_batch(batch: int, size: int, vocab: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.randint(1000, vocab - 2, (batch, 24), generator=g)
    ids[:, 0] = 30522  # [DEC]
    ids[:, -1] = 102  # [SEP]
    mask = torch.ones_like(ids)
    mask[1:, 18:] = 0  # some captions are shorter: padded
    return pixels.to(device), ids.to(device), mask.to(device)


def train_flops(config, batch: int, tokens: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward), matrix products only:
    2 FLOPs per multiply-add, as MFU counts them."""
    v, t = config.vision, config.text
    N, C = v.num_tokens, v.width
    vit = v.depth * (2 * N * (4 * C * C + 2 * C * v.mlp_dim) + 4 * N * N * C) + 2 * (N - 1) * 3 * v.patch_size**2 * C
    T, D = tokens, t.width
    per_layer = (2 * T * (4 * D * D + 2 * D * t.mlp_dim) + 4 * T * T * D  # self-attention, MLP
                 + 2 * T * 2 * D * D + 2 * N * 2 * t.encoder_width * D + 4 * T * N * D)  # cross-attention
    decoder = t.depth * per_layer + 2 * T * D * D + 2 * T * D * t.vocab_size  # LM head
    return 3 * batch * (vit + decoder)


FINETUNE = ("full", "freeze-vision", "cached", "lora")  # ours runs them all
HF_MODES = ("full", "lora")  # HF's: the obvious full step, and peft's LoRA
SIDE = {"ours": "ours", "hf": "HF"}  # as the table names them

# our LoRA targets -> the same layers in HF's BLIP, as regular expressions over HF's module names
HF_LAYERS = {
    "vision": ("vision_model", {"qkv": r"\.qkv", "proj": r"\.projection", "fc1": r"\.fc1", "fc2": r"\.fc2"}),
    "text": ("text_decoder", {"query": r"\.query", "key": r"\.key", "value": r"\.value",
                              "out": r"attention\.output\.dense",  # self- and cross-attention's
                              "fc1": r"\.intermediate\.dense", "fc2": r"\.layer\.\d+\.output\.dense",
                              "dense": r"\.predictions\.transform\.dense"}),  # the LM head's
}


def hf_lora_targets(targets: tuple[str, ...]):
    """peft's `target_modules` for the layers our `targets` name: with all of ours, the plain names a peft
    user writes ("dense" is HF's name for four of ours); else one regular expression of exactly those layers."""
    if set(targets) == set(LORA_TARGETS):
        return ["qkv", "projection", "fc1", "fc2", "query", "key", "value", "dense"]
    patterns = []
    for target in targets:
        scope, _, name = target.rpartition(".")
        for side, (prefix, layers) in HF_LAYERS.items():
            if scope in ("", side) and name in layers:
                patterns.append(rf"{prefix}\..*{layers[name]}")
    return "|".join(f"(?:{p})" for p in patterns)  # peft full-matches a string against each module's name


def token_rows(args) -> list[int]:
    """The word-embedding rows LoRA trains with --lora-tokens N: N ids, as the tokens of N words' captions."""
    return list(range(1000, 1000 + args.lora_tokens))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build(side: str, mode: str, folder: Path, args, device):
    """One side's model, loaded from the weights the parent saved in `folder` and set up for `mode` as
    train.py does (our side never imports transformers, as train.py does not)."""
    targets = parse_targets(args.lora_targets)
    if side == "hf":
        from transformers import BlipForConditionalGeneration

        model = BlipForConditionalGeneration.from_pretrained(folder / "hf")
        model.text_decoder.label_smoothing = 0.1  # HF shifts labels itself; smoothing as BLIP
        if mode == "lora":
            import peft

            rows = {"trainable_token_indices": token_rows(args), "ensure_weight_tying": True} \
                if args.lora_tokens else {}
            config = peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                     target_modules=hf_lora_targets(targets), **rows)
            model = peft.get_peft_model(model, config)  # freezes all but the adapters
    else:
        model = BlipCaptioner.from_pretrained(folder / "ours")
        if mode in ("freeze-vision", "cached"):
            model.visual_encoder.requires_grad_(False)
        elif mode == "lora":
            add_lora(model, LoraConfig(rank=args.lora_rank, alpha=2 * args.lora_rank, targets=targets))
            if args.lora_tokens:
                add_token_rows(model, token_rows(args))
        # what backward keeps: train.py's default for this device unless --recompute says
        model.set_recompute(pick_mode(args.recompute, model, device))
    return model.to(device).train()


def stepper(side: str, mode: str, model, batch, amp: str, device, tokens: ImageTokens | None = None):
    """One training step of `model` on `batch`, as `side` runs it in `mode`. tokens: the cache (cached mode)."""
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16" else nullcontext
    pixels, ids, mask = batch
    labels = caption_labels(ids, mask, 3, 30522)  # "a picture of" is not a target
    n_tokens = (labels[:, 1:] != -100).sum()
    rows = torch.arange(len(ids))  # the batch's views in the cache
    # train.py's AdamW, fused, over what trains
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.05,
                            fused=True)

    def step():
        if mode == "cached":  # as train.py: the rows copied out of the memory-mapped file, then to the device
            image_embeds = tokens[rows].to(device)
        with autocast():
            if side == "hf":
                loss = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels).loss
            elif mode == "cached":
                loss = caption_loss(model(None, ids, mask, image_embeds=image_embeds), labels, 0.1, "sum") / n_tokens
            else:
                loss = caption_loss(model(pixels, ids, mask), labels, 0.1, "sum") / n_tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def open_tokens(folder: Path) -> ImageTokens:
    """The image tokens the parent saved in `folder`, memory-mapped as train.py's cache."""
    return ImageTokens(np.load(folder / "tokens.npy", mmap_mode="r"))


def peak_rss_reset():
    """Start counting peak memory from now: Linux lets a process reset its peak RSS (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args):
    """One side and mode alone, loaded from the weights the parent saved: two steps, then the peak memory
    of those steps (weights, gradients, AdamW moments and activations) as JSON."""
    device = torch.device(args.device)
    folder = Path(args.weights)
    model = build(args.child, args.child_mode, folder, args, device)
    tokens = open_tokens(folder) if args.child_mode == "cached" else None
    batch = make_batch(args.batch, 384, 30524, device)
    step = stepper(args.child, args.child_mode, model, batch, args.amp_one, device, tokens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        peak_rss_reset()
    step()
    step()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss()
    print(json.dumps({"peak_bytes": peak}))


def peak_of(side: str, mode: str, amp: str, folder: Path, args) -> float:
    """Peak memory (GiB) of two `mode` steps of `side`, alone in a child process."""
    cmd = [sys.executable, str(HERE), "--child", side, "--child-mode", mode, "--amp-one", amp,
           "--weights", str(folder), "--batch", str(args.batch),
           "--threads", str(args.threads), "--device", args.device, "--recompute", args.recompute,
           "--lora-rank", str(args.lora_rank), "--lora-targets", args.lora_targets, "--lora-tokens",
           str(args.lora_tokens)]
    cmd += ["--plain-linear"] * args.plain_linear + ["--default-malloc"] * args.default_malloc
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"the {side} {mode} {amp} memory child failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**30


def mfu(flops_per_s: float, device) -> str:
    """Model FLOPs utilisation against the GPU's dense bf16 peak, for the GPUs whose peak is known here."""
    if device.type != "cuda":
        return ""
    peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks (SXM)
    name = torch.cuda.get_device_name(device)
    peak = next((p for key, p in peaks.items() if key in name), None)
    return f" (MFU {flops_per_s / peak:.1%} of {name}'s {peak / 1e12:.0f})" if peak else ""


def label(run) -> str:
    side, mode = run
    return f"HF+peft {mode}" if run == ("hf", "lora") else f"{SIDE[side]} {mode}"


def hf_match(run):
    """The HF row an our row is measured against (full: HF's full, lora: peft's), or None."""
    side, mode = run
    return ("hf", mode) if side == "ours" and mode in HF_MODES else None


def ratio(values: dict, run, other) -> float | None:
    a, b = values.get(run), values.get(other)
    return a / b if a and b else None


def times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def report(amp: str, runs, steps: dict, peaks: dict, params: dict, args, device):
    """One precision's table, a row per side and mode, and the targets the fine-tuning modes must meet."""
    speed = {run: args.batch / t for run, (t, _) in steps.items()}  # images/s
    full = ("ours", "full")
    peak_name = "peak RSS" if device.type == "cpu" else "peak CUDA"
    print(f"\n{amp}: {'':13s} {'step':>7s} {'images/s':>9s} {'vs full':>8s} {'vs HF':>6s} | {peak_name:>9s} "
          f"{'vs full':>8s} {'vs HF':>6s} | {'trainable':>10s} {'last loss':>9s}")
    for run in runs:
        t, loss = steps[run]
        peak = f"{peaks[run]:8.2f}G" if peaks[run] else f"{'-':>9s}"
        print(f"{label(run):19s} {t:7.3f}s {speed[run]:9.2f} {times(ratio(speed, run, full)):>8s} "
              f"{times(ratio(speed, run, hf_match(run))):>6s} | {peak} {times(ratio(peaks, run, full)):>8s} "
              f"{times(ratio(peaks, run, hf_match(run))):>6s} | {params[run] / 1e6:9.2f}M {loss:9.4f}")

    lora, peft = ("ours", "lora"), ("hf", "lora")
    targets = [  # (the target, [(measured ratio, bound, ">=" or "<=")])
        ("cached >= 5x the full fine-tune's images/s", [(ratio(speed, ("ours", "cached"), full), 5.0, ">=")]),
        ("ours LoRA peak memory <= 0.6x ours full's", [(ratio(peaks, lora, full), 0.6, "<=")]),
        ("ours LoRA >= 1.3x HF+peft's speed, <= 0.8x its peak",
         [(ratio(speed, lora, peft), 1.3, ">="), (ratio(peaks, lora, peft), 0.8, "<=")]),
    ]
    print(f"targets ({amp}):")
    for text, checks in targets:
        if any(x is None for x, _, _ in checks):
            verdict = "n/a (not measured)"
        else:
            verdict = "PASS" if all(x >= bound if op == ">=" else x <= bound for x, bound, op in checks) else "FAIL"
        print(f"  {text + ':':54s} {', '.join(times(x) for x, _, _ in checks):13s} {verdict}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, repeats=5)
    p.add_argument("--batch", type=int, default=4, help="images per step")
    p.add_argument("--amp", nargs="+", default=None, choices=["fp32", "bf16"],
                   help="precisions to measure (default: fp32, and bf16 autocast where the CPU or GPU has bf16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--modes", nargs="+", choices=FINETUNE, default=list(FINETUNE),
                   help="fine-tuning modes to measure (default: all; HF runs full and lora)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank, both sides (alpha = 2 x rank)")
    p.add_argument("--lora-targets", default=",".join(DEFAULT),
                   help="comma-separated layers to adapt, as train.py's --lora-targets (default: train.py's, the "
                   "attention projections and the text MLP); HF's are the same layers under HF's names")
    p.add_argument("--lora-tokens", type=int, default=300, metavar="N",
                   help="with LoRA, the word-embedding rows of N tokens train too, as train.py --lora-tokens data "
                   "(HF: peft's trainable_token_indices; default: 300, a few hundred words' pieces; 0: none)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--recompute", choices=["auto", *MODES], default="auto",
                   help="what our backward recomputes (blip/speed/recompute.py; default: train.py's, auto)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc settings as they are (train.py keeps freed memory for the next "
                        "step, blip/speed/memory.py; the setting is the process's, so both sides get it)")
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--child-mode", choices=FINETUNE, default="full", help=argparse.SUPPRESS)
    p.add_argument("--amp-one", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        targets = parse_targets(args.lora_targets)
    except ValueError as e:
        p.error(f"--lora-targets: {e}")
    backend = apply_common_args(args)
    if not args.default_malloc:  # as train.py does; process-wide, so HF's steps get it too
        keep_freed_memory()
    if args.child:
        return child(args)
    device = torch.device(args.device)
    has_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    amps = args.amp or (["fp32", "bf16"] if has_bf16 else ["fp32"])
    runs = [("ours", m) for m in FINETUNE if m in args.modes] + [("hf", m) for m in HF_MODES if m in args.modes]

    # the same weights for every run, saved: each run loads its own copy, as the modes change the model
    hf, ours = same_weights(args.size)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    hf.save_pretrained(tmp / "hf")
    ours.save_pretrained(tmp / "ours")
    batch = make_batch(args.batch, 384, 30524, device)
    if "cached" in args.modes:  # the batch's image tokens, made once by the frozen ViT, in a file as train.py's
        with torch.no_grad():
            np.save(tmp / "tokens.npy", ours.to(device).encode_image(batch[0]).float().cpu().numpy())
    config = ours.config
    del hf, ours
    if "lora" in args.modes:  # what a --lora run's folders hold, against the model file they adapt
        from safetensors.torch import save_file

        adapted = build("ours", "lora", tmp, args, torch.device("cpu"))
        save_file({k: v.contiguous() for k, v in lora_state_dict(adapted).items()}, str(tmp / "adapter.safetensors"))
        size, full = (tmp / "adapter.safetensors").stat().st_size, (tmp / "ours" / "model.safetensors").stat().st_size
        print(f"LoRA rank {args.lora_rank} on {args.lora_targets}, {args.lora_tokens} token rows: adapter file "
              f"{size / 1e6:.1f} MB, {size / full:.2%} of the model file ({full / 1e6:.0f} MB; target <= 3%: "
              f"{'PASS' if size <= 0.03 * full else 'FAIL'})")
        del adapted

    # memory first, each run alone in a child process, while this one holds no model
    peaks = {amp: {run: None if args.no_memory else peak_of(*run, amp, tmp, args) for run in runs} for amp in amps}

    models = {run: build(*run, tmp, args, device) for run in runs}
    params = {run: trainable(model) for run, model in models.items()}
    if ("ours", "lora") in models and ("hf", "lora") in models:
        ours_n, hf_n = params["ours", "lora"], params["hf", "lora"]
        print(f"LoRA rank {args.lora_rank} on {','.join(targets)}: trainable parameters ours {ours_n:,}, "
              f"HF+peft {hf_n:,}")
        assert ours_n == hf_n, "HF's LoRA layers are not ours: hf_lora_targets maps them wrong"
    tokens = open_tokens(tmp) if "cached" in args.modes else None
    results = {}
    for amp in amps:
        steps = [stepper(*run, models[run], batch, amp, device, tokens) for run in runs]
        medians, losses = alternate(steps, args.repeats, device)
        results[amp] = dict(zip(runs, zip(medians, losses, strict=True), strict=True))
    shutil.rmtree(tmp)

    print(f"{args.size} train step, batch {args.batch}, {args.device}, {args.threads} threads, {backend}, "
          f"torch {torch.__version__}, median of {args.repeats} steps, every run alternated; vs full: images/s "
          f"against ours full; vs HF: against the same mode's HF row (full: HF, lora: HF+peft)")
    flops = train_flops(config, args.batch, batch[1].shape[1])
    for amp in amps:
        report(amp, runs, results[amp], peaks[amp], params, args, device)
        full = {side: results[amp][side, "full"][0] for side in ("ours", "hf") if (side, "full") in runs}
        if full:
            print("  model TFLOP/s, full fine-tune: " + ", ".join(
                f"{SIDE[side]} {flops / t / 1e12:.2f}" + (mfu(flops / t, device) if side == "ours" else "")
                for side, t in full.items()))


if __name__ == "__main__":
    main()
