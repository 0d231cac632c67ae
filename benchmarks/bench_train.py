"""Training-step speed and peak memory, ours vs HF `BlipForConditionalGeneration`, same weights, same optimizer.

    python benchmarks/bench_train.py [--size base] [--batch 4] [--threads 2] [--repeats 5] [--amp fp32 bf16]
                                     [--device cpu]

One step = forward, BLIP's captioning loss, backward, AdamW step (lr 1e-5, weight decay 0.05, fused, as
train.py makes it; the same optimizer on both sides), full fine-tune. Ours runs the step the way train.py does
(loss summed over caption tokens, divided by their count; what backward recomputes as train.py's default for
the device, blip/recompute.py); HF runs it the obvious way
(`model(..., labels=labels).loss`). Speed: median of --repeats steps after a warm-up step, the two
sides alternated in one process, whose malloc keeps freed memory for the next step as train.py's does
(blip/memory.py; --default-malloc leaves glibc's settings). Peak memory: each side alone in a child
process, the peak RSS of two steps (counted from just before the first: Linux's resettable VmHWM), or the peak CUDA
allocation on a GPU; weights, gradients, AdamW moments and activations are all in it.
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

import torch
from common import add_common_args, apply_common_args, compare, same_weights

from blip import BlipCaptioner
from blip.captioner import cpu_has_bf16
from blip.memory import keep_freed_memory
from blip.model import caption_labels, caption_loss
from blip.recompute import MODES, pick_mode

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


def steppers(hf, ours, batch, amp: str, device, recompute: str = "auto"):
    """(our step, HF's step): each one full training step on the same batch."""
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16" else nullcontext
    pixels, ids, mask = batch
    labels = caption_labels(ids, mask, 3, 30522)  # "a picture of" is not a target
    n_tokens = (labels[:, 1:] != -100).sum()
    if hf is not None:  # HF shifts labels itself; smoothing as BLIP
        hf.text_decoder.label_smoothing = 0.1

    def optimizer(model):  # train.py's AdamW, fused, on both sides
        return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05, fused=True)

    if ours is not None:  # what backward keeps: train.py's default for this device unless --recompute says
        ours.set_recompute(pick_mode(recompute, ours, device))
    opt_ours = optimizer(ours) if ours is not None else None
    opt_hf = optimizer(hf) if hf is not None else None

    def ours_step():
        with autocast():
            loss = caption_loss(ours(pixels, ids, mask), labels, 0.1, "sum") / n_tokens
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def hf_step():
        with autocast():
            loss = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return loss.item()

    return ours_step, hf_step


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
    """One side alone, loaded from the weights the parent saved (our side never imports transformers,
    as train.py does not): two steps, then the peak memory of those steps (weights, gradients, AdamW
    moments and activations) as JSON."""
    device = torch.device(args.device)
    if args.child == "hf":
        from transformers import BlipForConditionalGeneration

        hf, ours = BlipForConditionalGeneration.from_pretrained(args.weights), None
    else:
        hf, ours = None, BlipCaptioner.from_pretrained(args.weights)
    (hf if ours is None else ours).to(device).train()
    batch = make_batch(args.batch, 384, 30524, device)
    ours_step, hf_step = steppers(hf, ours, batch, args.amp_one, device, args.recompute)
    step = hf_step if args.child == "hf" else ours_step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        peak_rss_reset()
    step()
    step()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss()
    print(json.dumps({"peak_bytes": peak}))


def peak_of(side: str, amp: str, weights: Path, args) -> float:
    cmd = [sys.executable, str(HERE), "--child", side, "--amp-one", amp, "--weights", str(weights),
           "--batch", str(args.batch), "--threads", str(args.threads), "--device", args.device]
    if args.plain_linear:
        cmd.append("--plain-linear")
    cmd += ["--recompute", args.recompute] + (["--default-malloc"] if args.default_malloc else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"] / 2**30


def mfu(flops_per_s: float, device) -> str:
    """Model FLOPs utilisation against the GPU's dense bf16 peak, for the GPUs whose peak is known here."""
    if device.type != "cuda":
        return ""
    peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks (SXM)
    name = torch.cuda.get_device_name(device)
    peak = next((p for key, p in peaks.items() if key in name), None)
    return f" (MFU {flops_per_s / peak:.1%} of {name}'s {peak / 1e12:.0f})" if peak else ""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, repeats=5)
    p.add_argument("--batch", type=int, default=4, help="images per step")
    p.add_argument("--amp", nargs="+", default=None, choices=["fp32", "bf16"],
                   help="precisions to measure (default: fp32, and bf16 autocast where the CPU or GPU has bf16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--recompute", choices=["auto", *MODES], default="auto",
                   help="what our backward recomputes (blip/recompute.py; default: train.py's, auto)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc settings as they are (train.py keeps freed memory for the next "
                        "step, blip/memory.py; the setting is the process's, so both sides get it)")
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--amp-one", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args()
    backend = apply_common_args(args)
    if not args.default_malloc:  # as train.py does; process-wide, so HF's steps get it too
        keep_freed_memory()
    if args.child:
        return child(args)
    device = torch.device(args.device)
    has_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    amps = args.amp or (["fp32", "bf16"] if has_bf16 else ["fp32"])

    hf, ours = same_weights(args.size)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    if not args.no_memory:  # the children load these: the same weights, each side alone
        hf.save_pretrained(tmp / "hf")
        ours.save_pretrained(tmp / "ours")
    hf, ours = hf.to(device).train(), ours.to(device).train()
    batch = make_batch(args.batch, 384, 30524, device)
    rows = []
    for amp in amps:
        ours_step, hf_step = steppers(hf, ours, batch, amp, device, args.recompute)
        t_ours, t_hf, l_ours, l_hf = compare(ours_step, hf_step, args.repeats, device)
        mem = (None, None) if args.no_memory else (peak_of("ours", amp, tmp / "ours", args),
                                                   peak_of("hf", amp, tmp / "hf", args))
        rows.append((amp, t_ours, t_hf, mem, l_ours, l_hf))
    shutil.rmtree(tmp)

    flops = train_flops(ours.config, args.batch, batch[1].shape[1])
    print(f"{args.size} train step, batch {args.batch}, {args.device}, {args.threads} threads, {backend}, "
          f"torch {torch.__version__}, median of {args.repeats} steps, ours and HF alternated")
    print(f"{'':6s} {'ours':>8s} {'HF':>8s} {'HF/ours':>8s} | {'peak ours':>10s} {'peak HF':>9s} {'ours/HF':>8s}")
    for amp, a, b, (ma, mb), la, lb in rows:
        mem = f"{ma:9.2f}G {mb:8.2f}G {ma / mb:7.2f}x" if ma else "(not measured)"
        print(f"{amp:6s} {a:7.3f}s {b:7.3f}s {b / a:7.2f}x | {mem}   images/s: ours {args.batch / a:.2f}, "
              f"HF {args.batch / b:.2f}; model TFLOP/s: ours {flops / a / 1e12:.2f}, HF {flops / b / 1e12:.2f}"
              f"{mfu(flops / a, device)}; last loss: ours {la:.4f}, HF {lb:.4f}")


if __name__ == "__main__":
    main()
