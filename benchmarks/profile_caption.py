"""Where a captioning run's time goes, phase by phase, each set against its floor: bench_cli.py (c)'s work
(its folder of photos, base size, random weights, fp32, the checkpoint's defaults: beam 3, batches of 16) in
this process, with the model calls timed one by one.

    python benchmarks/profile_caption.py [--photos 64] [--threads 2] [--batch 16]

Phases: loading the checkpoint, reading and resizing the photos, the ViT, each decoder layer's image
keys/values (once per image), and the decoding steps. The floors are bench_cli.py's: FLOPs over the best
rate this machine's kernels reach at the phase's shapes (bench_cli.rates, each product its own weight). A
decoding step also reads every decoder weight and every image key/value of its batch from memory, which
those rates do not count: the last line sets that traffic against this machine's read rate (the sum of a
1 GiB tensor).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_cli
import torch
from bench_cli import ROOT, TEXT_LAYERS, D, N, best_time, decoding_flops, image_flops, image_kv_flops, rates

sys.path.insert(0, str(ROOT))
from blip.decoding import generate_from  # noqa: E402
from blip.image import load_image, preprocess  # noqa: E402
from blip.speed.memory import keep_freed_memory  # noqa: E402
from blip.tool.captioner import Captioner  # noqa: E402


def clock(fn, *args):
    """(fn(*args), seconds it took)."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def image_kv_bytes(images: int) -> int:
    """The fp32 cross-attention keys and values of `images` images, every decoder layer's: what each decoding
    step reads besides the weights."""
    return TEXT_LAYERS * 2 * images * N * D * 4


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=64, help="photos in the folder (bench_cli.py (c)'s: 64)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the CI machine has 2 cores)")
    p.add_argument("--batch", type=int, default=16, help="pictures per batch (caption.py's default: 16)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as caption.py does
    work = tempfile.TemporaryDirectory(prefix="profile_caption_")  # removed when the process ends
    tmp = Path(work.name)
    _, ours, _ = bench_cli.build(tmp)
    names = bench_cli.make_folder(tmp / "folder", args.photos)
    import_torch = min(clock(subprocess.run, [sys.executable, "-c", "import torch"])[1] for _ in range(3))
    captioner, load = clock(lambda: Captioner.from_pretrained(ours, device="cpu", dtype="fp32"))
    pixels, read = clock(lambda: preprocess([load_image(tmp / "folder" / n) for n in names], captioner.image_size))
    model, cfg = captioner.model, captioner.defaults
    prompt = captioner.tokenizer.encode_prompt(captioner.prompt)
    # what each decoding step reads: every decoder weight it multiplies by (the image keys/values' own weights
    # run once per image, in their phase) and the batch's image keys/values of every layer
    decoder = model.text_decoder
    skip = {id(w) for layer in decoder.layers for w in (layer.cross_attn.key.weight, layer.cross_attn.value.weight)}
    skip.add(id(decoder.embeddings.position.weight))
    weights = sum(w.numel() * w.element_size() for w in decoder.parameters() if id(w) not in skip)
    calls = []  # decoder calls: the prompt, then one per new token of the batch's beams
    decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    vit = kv = decoding = 0.0
    new_tokens, traffic, steps = [], 0, 0
    with torch.inference_mode():
        for i in range(0, len(names), args.batch):
            tokens, t = clock(model.encode_image, pixels[i : i + args.batch])
            vit += t
            kv += clock(model.new_cache, tokens)[1]  # what generate_from does first, timed alone
            calls.clear()
            ids, t = clock(generate_from, model, tokens, prompt, cfg)
            decoding += t
            new_tokens += [len(x) for x in ids]
            steps += len(calls)
            traffic += len(calls) * (weights + image_kv_bytes(len(tokens)))
    decoding -= kv

    r, _ = rates(args.batch, cfg.num_beams, args.threads)
    n, g = len(names), 1e9
    kv_linear = image_kv_flops()
    image_linear, image_attention = image_flops()
    dec = [decoding_flops(len(prompt), t, cfg.num_beams) for t in new_tokens]
    floors = {
        "ViT": n * (image_linear - kv_linear + image_attention) / r["large"],
        "image keys/values": n * kv_linear / r["large"],
        "decoding steps": sum(sum(f) for f in dec) / r["few"],
    }
    phases = {"import torch": (import_torch, None), "load checkpoint": (load, None),
              f"read + resize {n} photos": (read, None), "ViT": (vit, floors["ViT"]),
              "image keys/values": (kv, floors["image keys/values"]),
              "decoding steps": (decoding, floors["decoding steps"])}
    print(f"base, cpu fp32, {args.threads} threads, {n} photos in batches of {args.batch}, beam {cfg.num_beams}, "
          f"{sum(new_tokens) / n:.1f} new tokens a caption, torch {torch.__version__}")
    print(f"{'phase':28s} {'ours':>8s} {'floor':>8s} {'ours/floor':>10s}")
    for name, (t, floor) in phases.items():
        print(f"{name:28s} {t:7.2f}s " + (f"{floor:7.2f}s {t / floor:9.2f}x" if floor else f"{'':8s} {'':>10s}"))
    total, floor = sum(t for t, _ in phases.values()), sum(floors.values())
    print(f"{'total':28s} {total:7.2f}s {floor:7.2f}s {total / (floor + import_torch):9.2f}x (of floor + import torch)")

    big = torch.randn(2**28)
    bandwidth = big.numel() * 4 / best_time(big.sum)
    reads = traffic / bandwidth
    print(f"decoding reads {traffic / g:.1f} GB in {steps} steps (each: the decoder's {weights / 2**20:.0f} "
          f"MiB of weights, {image_kv_bytes(args.batch) / 2**20:.0f} MiB of image keys/values at {args.batch} "
          f"pictures): "
          f"{reads:.2f}s at this machine's read rate, {bandwidth / g:.1f} GB/s")
    print(f"floor + those reads + import torch: {floor + reads + import_torch:.2f}s; ours {total:.2f}s = "
          f"{total / (floor + reads + import_torch):.2f}x of it")
    print(f"rates: ViT linears {r['large'] / g:.0f} GFLOP/s, ViT attention at its own shape "
          f"{r['vit attention'] / g:.0f} GFLOP/s (the floor counts it at the linears' rate), decoding "
          f"{r['few'] / g:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
