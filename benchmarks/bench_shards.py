"""Captioning webdataset shards as whole processes, ours against HF's processor + generate on the same shards:
pictures/s and peak memory, on a GPU (the check to run when one is lent: benchmarks/gpu_caption.sh) or the CPU.

    python benchmarks/bench_shards.py [--device cuda] [--dtype bf16] [--photos 1024] [--shards 8] [--batch 64]

Builds a base-size model with random weights (an HF snapshot and our folder converted from it, as
bench_cli.py does), --photos of scikit-image's photographs (bench_cli.make_folder) as --shards tar shards of
JPEGs. Ours: `caption.py "shards/{...}.tar" --output-dir D --device --dtype --batch-size`. HF: the script
below, reading the same shards as a stream, `BlipProcessor` + `generate` in batches of --batch, BLIP's
decoding (beam 3, 5 to 20 new tokens, prompt "a picture of "). Each side runs --repeats times, alternated;
the median wall time (start to exit) gives pictures/s. Peak memory: on a GPU, the most PyTorch's allocator
held (each process prints it as it ends), on the CPU the peak RSS (bench_cli.py's launcher).
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_cli
from bench_cli import ROOT

# HF's side: the shards read as streams, batches of pictures through the processor and generate
HF_SHARDS = """
import io, json, sys, tarfile
import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor
folder, device, dtype, batch, out = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), int(sys.argv[4]), sys.argv[5]
shards = sys.argv[6:]
model = BlipForConditionalGeneration.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
processor = BlipProcessor.from_pretrained(folder)
prompt = "a picture of "

def samples():
    for shard in shards:
        with tarfile.open(shard, "r|") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    yield member.name.split(".")[0], image

def batches():
    keys, images = [], []
    for key, image in samples():
        keys.append(key)
        images.append(image)
        if len(keys) == batch:
            yield keys, images
            keys, images = [], []
    if keys:
        yield keys, images

with open(out, "w") as f, torch.inference_mode():
    for keys, images in batches():
        inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt").to(device)
        ids = model.generate(pixel_values=inputs.pixel_values.to(dtype), input_ids=inputs.input_ids, num_beams=3,
                             max_new_tokens=20, min_new_tokens=5)
        for key, text in zip(keys, processor.batch_decode(ids, skip_special_tokens=True)):
            f.write(json.dumps({"key": key, "caption": text.removeprefix(prompt.strip()).strip()}) + "\\n")
if device == "cuda":
    print("peak GPU memory", torch.cuda.max_memory_allocated(), flush=True)
"""

# our side: caption.py's main, then the peak of PyTorch's GPU allocator (caption.py itself ends with os._exit)
OURS_SHARDS = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import caption
code = caption.main(sys.argv[2:])
if torch.cuda.is_available():
    print("peak GPU memory", torch.cuda.max_memory_allocated(), flush=True)
sys.exit(code)
"""


def timed(cmd: list[str], env: dict) -> dict:
    """Run `cmd` through bench_cli's launcher: wall seconds, peak RSS (GB) and the peak GPU memory it printed (GB)."""
    result = bench_cli.run(cmd, env)
    gpu = [line.split()[-1] for line in result["lines"] if line.startswith("peak GPU memory")]
    return {**result, "gpu": int(gpu[-1]) / 1e9 if gpu else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16", help="both sides' (default: bf16)")
    p.add_argument("--photos", type=int, default=1024, help="photos in all the shards (default: 1024)")
    p.add_argument("--shards", type=int, default=8, help="tar shards they are split into (default: 8)")
    p.add_argument("--batch", type=int, default=64, help="pictures per batch, both sides (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side (median reported)")
    args = p.parse_args()
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    tmp = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        hf, ours, _ = bench_cli.build(tmp)
        names = bench_cli.make_folder(tmp / "folder", args.photos)
        pattern = bench_cli.make_shards(tmp / "folder", tmp / "shards", args.shards)
        shards = sorted(str(s) for s in (tmp / "shards").glob("*.tar"))
        runs = {"ours": [], "HF": []}
        for i in range(args.repeats):
            runs["ours"].append(timed([sys.executable, "-c", OURS_SHARDS, str(ROOT), pattern, "--checkpoint", str(ours),
                                       "--output-dir", str(tmp / f"ours{i}"), "--device", args.device, "--dtype",
                                       args.dtype, "--batch-size", str(args.batch)], env))
            runs["HF"].append(timed([sys.executable, "-c", HF_SHARDS, str(hf), args.device, torch_dtype,
                                     str(args.batch), str(tmp / f"hf{i}.jsonl"), *shards], env))
            ours_captions = bench_cli.read_shard_outputs(tmp / f"ours{i}", names)
        hf_captions = {r["key"]: r["caption"] for r in map(json.loads, (tmp / f"hf{i}.jsonl").read_text().splitlines())}
        if sorted(hf_captions) != sorted(ours_captions):
            raise SystemExit(f"HF captioned {len(hf_captions)} pictures, ours {len(ours_captions)}")
    finally:
        shutil.rmtree(tmp)

    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "all")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, OMP_NUM_THREADS={threads}"
    n = len(names)
    print(f"base, {where}, {args.dtype}, {n} photos in {args.shards} tar shards, batches of {args.batch}, beam 3, "
          f"torch {torch.__version__}, whole processes, median of {args.repeats}, alternated "
          f"({time.strftime('%Y-%m-%d')})")
    print(f"{'':6s} {'wall':>8s} {'pictures/s':>11s} {'peak GPU memory':>16s} {'peak RSS':>9s}")
    med = {}
    for side, rs in runs.items():
        wall = statistics.median(r["wall"] for r in rs)
        gpu = [r["gpu"] for r in rs if r["gpu"] is not None]
        rss = statistics.median(r["rss"] for r in rs)
        med[side] = wall
        print(f"{side:6s} {wall:7.2f}s {n / wall:11.1f} "
              f"{(f'{max(gpu):.2f} GB' if gpu else '-'):>16s} {rss:8.2f}G   runs: "
              + ", ".join(f"{r['wall']:.2f}" for r in rs))
    same = sum(ours_captions[k] == hf_captions[k] for k in ours_captions)
    print(f"ours / HF pictures/s: {med['HF'] / med['ours']:.2f}x; captions identical: {same} of {n}")


if __name__ == "__main__":
    main()
