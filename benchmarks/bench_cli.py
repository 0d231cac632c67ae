"""Whole processes, as a user runs them: `python caption.py ...` against the shortest HF script that does
the same (import transformers, `from_pretrained`, `BlipProcessor`, `generate`), same weights.

    python benchmarks/bench_cli.py [--repeats 3] [--threads 2] [--dtype fp32] [--packed-linear] [--parts abc]
                                   [--photos 64]

Builds a base-size model with random weights: an HF snapshot (model and a BlipProcessor whose WordPiece
vocabulary has BERT's 30522 entries) and our folder converted from it by convert_weights.py, and 8 photos
(640 x 480 JPEG). Then each case runs --repeats times, ours and HF alternated, each in a fresh process:

  (a) one photo, default settings: beam 3, 5 to 20 new tokens, prompt "a picture of "
  (b) 8 photos (a folder), beam 3, exactly 20 new tokens, one batch of 8

  (c) a folder of --photos (64) scikit-image photographs, 256 to 1024 px, JPEG / PNG / WebP, as a user
      captions a data set: ours `caption.py FOLDER --format jsonl --output F` with the checkpoint's defaults
      (fp32), HF benchmarks/hf_caption_folder.py (BlipProcessor + generate, batches of 8, same decoding)

For each child: wall time from start to exit, time to its first caption line, and peak RSS (the
child's own, from a small launcher process: see LAUNCH). Medians are printed with the ratios HF / ours
(time) and ours / HF (memory).

(c) is also set against a FLOOR: the time this machine's matrix products alone need for the same work,
FLOPs counted per image (see image_flops, decoding_flops) over the best rate this machine's kernels reach at
the work's shapes (see rates), with --threads threads: large rows for the image side, few rows for the decoding steps.
Each product reads a weight of its own, as the model's layers do; the floor with one weight per shape,
timed again and again while it stays in the CPU's caches, is printed beside it (lower: no model runs so).
Each linear's shape is timed with torch.matmul and with oneDNN on a packed weight, and the floor takes the
faster (the machine's best kernel). (c) runs ours a second time on the same photos as 4 webdataset tar
shards of JPEGs (`caption.py "shards/{00000..00003}.tar" --output-dir`). Two targets are printed with
PASS/FAIL for each: ours within 1.25x of floor + `python -c "import torch"`, and ours at >= 2.5x HF's
pictures/s with a peak RSS no larger than HF's.

    python benchmarks/bench_cli.py --parts c --photos 8 --repeats 1    # a quick functional check of (c)
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

# HF's side: what its model card shows, with the settings of each case
HF_SCRIPT = """
import sys
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor
folder, beams, min_new, max_new, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
paths = sys.argv[6:]
import torch
model = BlipForConditionalGeneration.from_pretrained(folder, torch_dtype=getattr(torch, dtype)).eval()
processor = BlipProcessor.from_pretrained(folder)
images = [Image.open(p).convert("RGB") for p in paths]
inputs = processor(images, ["a picture of"] * len(images), return_tensors="pt").to(model.dtype)
with torch.inference_mode():
    out = model.generate(**inputs, num_beams=beams, min_new_tokens=min_new, max_new_tokens=max_new)
for p, ids in zip(paths, out):
    print(f"{p}: {processor.decode(ids, skip_special_tokens=True)}", flush=True)
"""


def make_vocab(path: Path):
    """A WordPiece vocabulary with BERT's size and special-token ids ([PAD] 0, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103), characters, a few words, and filler words."""
    words = [f"[unused{i}]" for i in range(99)]
    words = ["[PAD]", *words, "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)]
    words += chars + ["##" + c for c in chars] + ["picture", "of", "photo", "dog", "cat", "on", "the"]
    words += [f"word{i}" for i in range(30522 - len(words))]
    path.write_text("".join(w + "\n" for w in words))


def build(tmp: Path):
    """HF snapshot, our converted folder, and 8 photos under `tmp`."""
    from common import hf_model
    from transformers import BertTokenizerFast, BlipImageProcessor, BlipProcessor

    make_vocab(tmp / "vocab.txt")
    tokenizer = BertTokenizerFast(str(tmp / "vocab.txt"), bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    hf_model("base").save_pretrained(tmp / "hf")
    BlipProcessor(BlipImageProcessor(), tokenizer).save_pretrained(tmp / "hf")
    subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), str(tmp / "hf"), str(tmp / "ours")],
                   check=True, stdout=subprocess.DEVNULL)
    photos = tmp / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):  # smooth colour fields with noise: JPEG-sized like a photo
        y, x = np.mgrid[0:480, 0:640] / 640
        base = np.stack([np.sin(x * (3 + i)), np.cos(y * (2 + i)), np.sin((x + y) * 4)], -1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(photos / f"photo{i}.jpg", quality=90)
    return tmp / "hf", tmp / "ours", sorted(photos.iterdir())


# (c)'s folder: scikit-image's photographs (colour and grey), resized so the long side is one of SIZES, saved
# in one of FORMATS; photo, size and format cycle with different periods, so the 64 files mix them all
PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "coins.png", "moon.png", "brick.png"]
SIZES = [256, 384, 512, 640, 800, 1024]
FORMATS = [("jpg", {"quality": 95}), ("png", {}), ("jpg", {"quality": 75}), ("webp", {"quality": 80}),
           ("jpg", {"quality": 50})]


def make_folder(folder: Path, n: int) -> list[str]:
    """`n` photos in `folder` (same files every run); returns their names."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    folder.mkdir()
    sources = {}
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        if name not in sources:
            with Image.open(data / name) as image:
                sources[name] = image.convert("RGB" if image.mode not in ("RGB", "L") else image.mode)
        source, long_side, (suffix, options) = sources[name], SIZES[i % len(SIZES)], FORMATS[i % len(FORMATS)]
        scale = long_side / max(source.size)
        size = (round(source.width * scale), round(source.height * scale))
        source.resize(size, Image.Resampling.LANCZOS).save(folder / f"{i:03d}_{Path(name).stem}_{long_side}.{suffix}",
                                                           **options)
    return sorted(p.name for p in folder.iterdir())


def read_jsonl(path: Path, names: list[str]) -> list[dict]:
    """The records of one side's output; exits unless there is one per photo of the folder."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if sorted(Path(r["image"]).name for r in records) != names:
        raise SystemExit(f"{path.name}: {len(records)} records, expected one for each of the {len(names)} photos")
    return records


# base captioner at 384 px (BLIP_NOTES.md): ViT-B/16 over N = 1 + 24² tokens of width C, a 12-layer text
# decoder of width D; both MLPs 4x wide. FLOPs are 2 per multiply-add.
N, C, VIT_LAYERS, PATCH_IN = 577, 768, 12, 3 * 16 * 16
D, TEXT_LAYERS, VOCAB, HEAD_DIM = 768, 12, 30524, 64
MLP = 4 * C


def image_kv_flops() -> int:
    """FLOPs per image of the decoder's cross-attention keys and values of the image tokens (every layer's)."""
    return 2 * TEXT_LAYERS * 2 * N * C * D


def image_flops() -> tuple[int, int]:
    """(linear, attention) FLOPs per image, computed once per image: the patch embedding, the ViT (qkv, proj,
    MLP; attention's q.k and p.v) and the decoder's cross-attention keys and values of the image tokens."""
    linear = (N - 1) * PATCH_IN * C + VIT_LAYERS * N * (3 * C * C + C * C + 2 * C * MLP)
    attention = VIT_LAYERS * 2 * N * N * C
    return 2 * linear + image_kv_flops(), 2 * attention


def decoding_flops(prompt: int, new_tokens: int, beams: int) -> tuple[int, int]:
    """(linear, attention) FLOPs to decode one caption of `new_tokens` new tokens after `prompt` tokens ([DEC]
    and the prompt): the prompt's positions once, then each beam's token for new tokens 2..new_tokens (the
    first comes from the prompt's last position). Per position and layer: self-attention q, k, v, out (4 D²),
    cross-attention q, out (2 D²; its keys/values are the image's, in image_flops), MLP (2 D x MLP), attention
    over the N image tokens and the positions so far (scores and weighted sum); the LM head (dense D², decoder
    D x VOCAB) where logits are needed: the prompt's last position and each beam's steps."""
    body = TEXT_LAYERS * (6 * D * D + 2 * D * MLP)
    head = D * D + D * VOCAB

    def seen(position):  # attention at this position: scores and weighted sum over the image and the text so far
        return TEXT_LAYERS * 2 * (N + position + 1) * D

    linear = prompt * body + head + beams * (new_tokens - 1) * (body + head)
    attention = sum(seen(i) for i in range(prompt)) + beams * sum(seen(prompt + t) for t in range(new_tokens - 1))
    return 2 * linear, 2 * attention


def rates(batch: int, beams: int, threads: int, own_weights: bool = True) -> tuple[dict[str, float], dict]:
    """FLOP/s (fp32, `threads` threads) at the shapes of the work, each kind of product weighted by how often
    it occurs: "large" rows (a batch's image tokens through the ViT's and the cross-attention's linears), "few"
    rows (a batch's beams through the decoder's linears and LM head), and, for reference, the attention
    products at their own shapes (per head): "vit attention" and "decoding attention". Each linear's shape
    is timed with torch.matmul and with oneDNN on a packed weight (blip/speed/linear.py), and counts at the
    faster of the two on this machine: the floor is what the best kernel the machine has would need.
    Returns (rates, the kernel that won each linear shape).

    own_weights: each product reads a weight of its own, as each of the model's layers does (the decoder's
    weights, 0.5 GB in fp32, are read from memory at every step; a decoding step's few rows are then bound
    by memory bandwidth); else one weight per shape is timed again and again, hot in the CPU's caches, a
    rate the model cannot have. Each shape: the best of 5 rounds of >= 50 ms."""
    import torch

    from blip.speed import linear

    torch.set_num_threads(threads)
    rows, heads, few = batch * N, batch * C // HEAD_DIM, batch * beams
    kinds = {  # kind: [(count, (batch, m, k, n)), ...]
        "large": [(VIT_LAYERS, (1, rows, C, 3 * C)), (VIT_LAYERS, (1, rows, C, C)), (VIT_LAYERS, (1, rows, C, MLP)),
                  (VIT_LAYERS, (1, rows, MLP, C)), (2 * TEXT_LAYERS, (1, rows, C, D)), (1, (1, rows, PATCH_IN, C))],
        "few": [(6 * TEXT_LAYERS + 1, (1, few, D, D)), (TEXT_LAYERS, (1, few, D, MLP)),
                (TEXT_LAYERS, (1, few, MLP, D)), (1, (1, few, D, VOCAB))],
        "vit attention": [(1, (heads, N, HEAD_DIM, N)), (1, (heads, N, N, HEAD_DIM))],
        "decoding attention": [(1, (heads, beams, HEAD_DIM, N)), (1, (heads, beams, N, HEAD_DIM))],
    }
    out, winners = {}, {}
    for kind, products in kinds.items():
        seconds, flops = 0.0, 0
        for count, (b, m, k, n) in products:
            a = torch.randn(b, m, k).squeeze(0)
            weights = [torch.randn(b, k, n).squeeze(0) for _ in range(count if own_weights else 1)]
            result = torch.empty(b, m, n).squeeze(0)
            kernels = {"matmul": lambda a=a, ws=weights, r=result, c=count: [
                torch.matmul(a, ws[i % len(ws)], out=r) for i in range(c)]}
            if b == 1 and linear.AVAILABLE:  # a linear layer's product: also on oneDNN's packed weights
                packed = [torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous()) for w in weights]
                kernels["packed oneDNN"] = lambda a=a, ps=packed, c=count: [
                    torch.ops.mkldnn._linear_pointwise(a, ps[i % len(ps)], None, "none", [], "") for i in range(c)]
            times = {name: best_time(fn) for name, fn in kernels.items()}
            if b == 1:
                winners[(m, k, n)] = min(times, key=times.get)
            seconds += min(times.values())
            flops += count * 2 * b * m * k * n
        out[kind] = flops / seconds  # a floor: whatever else the machine does only adds time
    return out, winners


def best_time(fn) -> float:
    """Seconds of one call of `fn`: the best of 5 rounds of calls of >= 50 ms each."""
    fn()
    start = time.perf_counter()
    fn()
    calls = max(1, math.ceil(0.05 / (time.perf_counter() - start)))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return min(times)


# our side with the packed oneDNN path on (blip/speed/linear.py), as it runs by default on non-Intel CPUs
PACKED = """
import runpy, sys
from blip.speed import linear
linear.ONEDNN = linear.AVAILABLE
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# Each child is started by this small process, which reports the child's start time and peak RSS. Linux
# carries a process's peak RSS across exec, so a child forked straight from this benchmark (which holds
# the models it built, 1.6 GB) would report at least that much whatever it used itself.
LAUNCH = """
import json, resource, subprocess, sys, time
start = time.time()
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"start": start, "end": time.time(), "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, f)
sys.exit(code)
"""


def run(cmd: list[str], env: dict) -> dict:
    """One child process: wall time, time to its first output line, peak RSS, exit code."""
    with tempfile.TemporaryFile("w+") as err, tempfile.NamedTemporaryFile("r") as report:
        # stderr to a file, not a pipe: a chatty stderr cannot block the child
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, report.name, *cmd], stdout=subprocess.PIPE,
                                stderr=err, env=env, text=True, cwd=ROOT)
        first, lines = None, []
        for line in proc.stdout:
            if first is None:
                first = time.time()
            lines.append(line)
        if proc.wait() != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{err.read()[-2000:]}")
        child = json.load(report)
    first = first if first is not None else child["end"]  # no output: the end is when it would have come
    return {"wall": child["end"] - child["start"], "first": first - child["start"],
            "rss": child["rss"] * 1024 / 2**30, "lines": lines}


def run_folder(args, ours_cmd: list[str], hf: Path, ours: Path, tmp: Path, env: dict) -> dict:
    """(c): --repeats runs each of ours, HF and `python -c "import torch"`, alternated, both sides' records checked;
    then what the floor needs: the new tokens ours wrote per caption, and the matmul rates."""
    from transformers import AutoTokenizer

    # the floor and HF's script assume BLIP's decoding: make sure it is what ours runs by default
    config = json.loads((ours / "config.json").read_text())
    expected = {"num_beams": 3, "max_new_tokens": 20, "min_new_tokens": 5}
    defaults = config.get("prompt"), config.get("generation")
    if defaults != ("a picture of ", expected):
        raise SystemExit(f"{ours}: decoding defaults {defaults}; (c) needs 'a picture of ', {expected}")
    folder = tmp / "folder"
    names = make_folder(folder, args.photos)
    shards = make_shards(folder, tmp / "shards", SHARDS)
    runs = {"ours": [], "ours, shards": [], "HF": [], "import torch": []}
    for i in range(args.repeats):
        out_ours, out_hf = tmp / f"ours{i}.jsonl", tmp / f"hf{i}.jsonl"
        runs["ours"].append(run([*ours_cmd, str(folder), "--checkpoint", str(ours), "--format", "jsonl",
                                 "--output", str(out_ours)], env))
        runs["ours, shards"].append(run([*ours_cmd, shards, "--checkpoint", str(ours), "--output-dir",
                                         str(tmp / f"shards{i}")], env))
        runs["HF"].append(run([sys.executable, str(ROOT / "benchmarks" / "hf_caption_folder.py"), str(hf),
                               str(folder), str(out_hf)], env))
        runs["import torch"].append(run([sys.executable, "-c", "import torch"], env))
        captions = [r["caption"] for r in read_jsonl(out_ours, names)]
        read_jsonl(out_hf, names)
        read_shard_outputs(tmp / f"shards{i}", names)
    # new tokens per caption, from ours' text: its tokens plus the end token, at most BLIP's 20
    tokenizer = AutoTokenizer.from_pretrained(hf)
    prompt = len(tokenizer("a picture of ").input_ids) - 1  # [DEC] (in [CLS]'s place) and the prompt, no [SEP]
    new_tokens = [min(len(tokenizer(c, add_special_tokens=False).input_ids) + 1, 20) for c in captions]
    # the products at the shapes ours runs: its default batch of pictures
    sys.path.insert(0, str(ROOT))
    import caption

    batch = min(caption.parse_args(["x"]).batch_size, len(names))
    own, winners = rates(batch, 3, args.threads)
    return {"runs": runs, "photos": len(names), "prompt": prompt, "new_tokens": new_tokens, "batch": batch,
            "rates": own, "winners": winners, "hot rates": rates(batch, 3, args.threads, own_weights=False)[0]}


def batch_floor(hf: Path, photos: int, new_tokens: int, threads: int) -> float:
    """Seconds the matrix products of captioning `photos` in one batch (beam 3, `new_tokens` new tokens each)
    need at this machine's best kernel per shape: the image side at large rows, decoding at few."""
    from transformers import AutoTokenizer

    prompt = len(AutoTokenizer.from_pretrained(hf)("a picture of ").input_ids) - 1  # [DEC] + the prompt
    rate = rates(photos, 3, threads)[0]
    image, decoding = sum(image_flops()) * photos, sum(decoding_flops(prompt, new_tokens, 3)) * photos
    return image / rate["large"] + decoding / rate["few"]


SHARDS = 4  # (c)'s photos again, as webdataset tar shards of JPEGs


def make_shards(folder: Path, out: Path, n: int) -> str:
    """The folder's photos as `n` webdataset tar shards (key.jpg, JPEG quality 95, as img2dataset writes
    them); returns their brace pattern."""
    import io
    import tarfile

    out.mkdir()
    photos = sorted(folder.iterdir())
    for s in range(n):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for photo in photos[s::n]:
                data = io.BytesIO()
                with Image.open(photo) as image:
                    image.convert("RGB").save(data, "JPEG", quality=95)
                info = tarfile.TarInfo(f"{photo.stem}.jpg")
                info.size = data.tell()
                data.seek(0)
                tar.addfile(info, data)
    return str(out / f"{{00000..{n - 1:05d}}}.tar")


def read_shard_outputs(folder: Path, names: list[str]) -> dict[str, str]:
    """The shards' outputs as {key: caption}; exits unless they hold a caption of each photo."""
    import pyarrow.parquet as pq

    captions = {r["key"]: r["caption"] for p in folder.glob("*.parquet") for r in pq.read_table(p).to_pylist()
                if r["caption"]}
    if sorted(captions) != sorted(Path(name).stem for name in names):
        raise SystemExit(f"{folder.name}: {len(captions)} captions, expected one for each of the {len(names)} photos")
    return captions


def report_folder(c: dict):
    """(c)'s table, the floor and the two targets."""
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("wall", "rss")} for side, rs in c["runs"].items()}
    o, h, import_torch, n, r = med["ours"], med["HF"], med["import torch"]["wall"], c["photos"], c["rates"]
    print(f"(c) {n} photos, defaults{'':7s} {'wall ours':>9s} {'HF':>7s} {'HF/ours':>8s} | {'pictures/s ours':>15s} "
          f"{'HF':>6s} | {'peak RSS ours':>13s} {'HF':>6s} {'ours/HF':>8s}")
    for side, name in (("ours", "a folder"), ("ours, shards", f"{SHARDS} tar shards of JPEGs")):
        s = med[side]
        print(f"  {name:30s} {s['wall']:8.2f}s {h['wall']:6.2f}s {h['wall'] / s['wall']:7.2f}x | "
              f"{n / s['wall']:15.2f} {n / h['wall']:6.2f} | "
              f"{s['rss']:12.2f}G {h['rss']:5.2f}G {s['rss'] / h['rss']:7.2f}x")
    walls = {side: ", ".join(f"{x['wall']:.2f}" for x in rs) for side, rs in c["runs"].items()}
    print(f"{'':32s} runs: ours {walls['ours']}; ours, shards {walls['ours, shards']}; HF {walls['HF']}; "
          f"import torch {walls['import torch']}")
    print("  best kernel per linear shape (rows, in, out): "
          + ", ".join(f"{m}x{k}x{n_}: {w}" for (m, k, n_), w in c["winners"].items()))

    image_linear, image_attention = (n * f for f in image_flops())
    decoding = [decoding_flops(c["prompt"], t, 3) for t in c["new_tokens"]]
    decoding_linear, decoding_attention = (sum(f[i] for f in decoding) for i in (0, 1))
    image, decoding = image_linear + image_attention, decoding_linear + decoding_attention
    g = 1e9
    floors = {}
    for rates_, what in ((c["hot rates"], "one weight per shape, hot in cache"), (r, "each product its own weight")):
        floor = image / rates_["large"] + decoding / rates_["few"]
        own_shapes = (image_linear / rates_["large"] + image_attention / rates_["vit attention"]
                      + decoding_linear / rates_["few"] + decoding_attention / rates_["decoding attention"])
        print(f"floor ({what}) {floor:.2f}s = image side {image / n / g:.1f} GFLOP/photo at "
              f"{rates_['large'] / g:.1f} GFLOP/s ({c['batch'] * N}-row products) + decoding {decoding / n / g:.2f} "
              f"GFLOP/photo ({statistics.mean(c['new_tokens']):.1f} new tokens a caption on average, beam 3) at "
              f"{rates_['few'] / g:.1f} GFLOP/s ({c['batch'] * 3}-row products); x {n} photos")
        print(f"  (attention products timed at their own shapes, per head: vit {rates_['vit attention'] / g:.1f} "
              f"GFLOP/s, decoding {rates_['decoding attention'] / g:.1f} GFLOP/s: floor {own_shapes:.2f}s)")
        print(f"  ours = {o['wall'] / floor:.2f}x this floor, {o['wall'] / (floor + import_torch):.2f}x (floor + "
              f"import torch {import_torch:.2f}s); HF = {h['wall'] / floor:.2f}x floor")
        floors[what] = floor
    floor = floors["each product its own weight"]  # the model's work: every layer reads its own weights
    for side in ("ours", "ours, shards"):
        near = med[side]["wall"] / (floor + import_torch)
        speed, memory = h["wall"] / med[side]["wall"], med[side]["rss"] / h["rss"]
        print(f"target: {side} within 1.25x of (floor + import torch): {near:.2f}x "
              f"{'PASS' if near <= 1.25 else 'FAIL'}")
        print(f"target: {side} >= 2.5x HF's pictures/s at peak RSS <= HF's: {speed:.2f}x at {memory:.2f}x "
              f"{'PASS' if speed >= 2.5 and memory <= 1 else 'FAIL'}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs of each side per case (median reported)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of both children (default: 2)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weights and activations of both sides in (a) and (b); (c) runs the defaults, fp32")
    p.add_argument("--packed-linear", action="store_true",
                   help="run ours with the packed oneDNN linear path, as on AMD CPUs, also where it is not the "
                        "default (Intel CPUs)")
    p.add_argument("--parts", default="abc", help="the cases to run, e.g. c for the folder alone (default: abc)")
    p.add_argument("--photos", type=int, default=64, help="photos in (c)'s folder (default: 64)")
    args = p.parse_args()
    if not args.parts or set(args.parts) - set("abc"):
        p.error("--parts takes letters of abc")
    ours_cmd = [sys.executable, "-c", PACKED, "caption.py"] if args.packed_linear else [sys.executable, "caption.py"]
    tmp = Path(tempfile.mkdtemp(prefix="bench_cli_"))
    try:
        hf, ours, photos = build(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        torch_dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
        cases = {
            "(a) 1 photo, defaults": (
                [*ours_cmd, str(photos[0]), "--checkpoint", str(ours), "--dtype", args.dtype],
                [sys.executable, "-c", HF_SCRIPT, str(hf), "3", "5", "20", torch_dtype, str(photos[0])]),
            "(b) 8 photos, beam 3, 20 tokens": (
                [*ours_cmd, str(photos[0].parent), "--checkpoint", str(ours), "--beams", "3",
                 "--min-length", "20", "--max-length", "20", "--batch-size", "8", "--dtype", args.dtype],
                [sys.executable, "-c", HF_SCRIPT, str(hf), "3", "20", "20", torch_dtype, *map(str, photos)]),
        }
        results = {}
        for name, (cmd_ours, cmd_hf) in cases.items():
            if name[1] not in args.parts:
                continue
            runs = {"ours": [], "HF": [], "import torch": []}
            for _ in range(args.repeats):
                runs["ours"].append(run(cmd_ours, env))
                runs["HF"].append(run(cmd_hf, env))
                runs["import torch"].append(run([sys.executable, "-c", "import torch"], env))
            results[name] = runs
        if "b" in args.parts:  # (b)'s floor: 8 photos, one batch, beam 3, exactly 20 new tokens each
            b_floor = batch_floor(hf, len(photos), 20, args.threads)
        folder = run_folder(args, ours_cmd, hf, ours, tmp, env) if "c" in args.parts else None
    finally:
        shutil.rmtree(tmp)

    import torch

    linear = "packed oneDNN linear" if args.packed_linear else "linear: this CPU's default"
    print(f"base, cpu {args.dtype}, {linear}, OMP_NUM_THREADS={args.threads}, torch {torch.__version__}, "
          f"whole processes, "
          f"median of {args.repeats}, ours and HF alternated")
    if results:
        print(f"{'':32s} {'wall ours':>9s} {'HF':>7s} {'HF/ours':>8s} | {'1st line ours':>13s} {'HF':>6s} | "
              f"{'peak RSS ours':>13s} {'HF':>6s} {'ours/HF':>8s}")
    for name, runs in results.items():
        med = {side: {k: statistics.median(r[k] for r in rs) for k in ("wall", "first", "rss")}
               for side, rs in runs.items() if side != "import torch"}
        o, h = med["ours"], med["HF"]
        print(f"{name:32s} {o['wall']:8.2f}s {h['wall']:6.2f}s {h['wall'] / o['wall']:7.2f}x | "
              f"{o['first']:12.2f}s {h['first']:5.2f}s | "
              f"{o['rss']:12.2f}G {h['rss']:5.2f}G {o['rss'] / h['rss']:7.2f}x")
        walls = {side: ", ".join(f"{r['wall']:.2f}" for r in rs) for side, rs in runs.items()}
        print(f"{'':32s} runs: ours {walls['ours']}; HF {walls['HF']}; import torch {walls['import torch']}")
        if name.startswith("(b)"):
            import_torch = statistics.median(r["wall"] for r in runs["import torch"])
            near = o["wall"] / (b_floor + import_torch)
            verdict = "PASS" if near <= 1.35 else "FAIL"
            print(f"{'':32s} floor {b_floor:.2f}s (best kernel per shape, each product its own weight) + import "
                  f"torch {import_torch:.2f}s: ours {near:.2f}x of it (target 1.35x: {verdict})")
    if folder:
        report_folder(folder)


if __name__ == "__main__":
    main()
