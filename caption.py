"""Caption images with a BLIP checkpoint folder.

    python caption.py photo.jpg
    python caption.py holiday/ "scans/*.png" --format jsonl --output captions.jsonl
    python caption.py photo.jpg --sample --top-p 0.9 --seed 0 --prompt "a picture of"

Beams, caption lengths and the prompt default to the checkpoint's own (config.json: "prompt" and
"generation"; BLIP's beam 3, 5 to 20 new tokens, "a picture of " for converted weights; train.py sets
the lengths from the captions it trained on).
"""

import argparse
import csv
import glob
import json
import os
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from blip.attention_map import draw
from blip.captioner import Captioner, Matcher
from blip.checkpoint import CheckpointError, read_config
from blip.config import BlipConfig
from blip.decoding import DecodeConfig
from blip.image import IMAGE_SUFFIXES, ImageError, load_image
from blip.trace import Trace

DEFAULT_CHECKPOINT = "checkpoints/blip-base"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Caption images with BLIP. PATHs are image files, folders (searched recursively for "
        f"{', '.join(sorted(IMAGE_SUFFIXES))}) or glob patterns.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or glob pattern")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, metavar="DIR",
                   help=f"checkpoint folder written by convert_weights.py or train.py (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--beams", type=int, metavar="N",
                   help="beam search width; 1 is greedy (default: the checkpoint's, BLIP's 3)")
    p.add_argument("--max-length", type=int, metavar="N",
                   help="most new tokens per caption, the end token counting (HF's max_new_tokens; default: the "
                   "checkpoint's, BLIP's 20, or what train.py found its captions need)")
    p.add_argument("--min-length", type=int, metavar="N",
                   help="fewest new tokens before the caption may end (HF's min_new_tokens; default: the "
                   "checkpoint's, BLIP's 5)")
    p.add_argument("--prompt", metavar="TEXT",
                   help="text the caption continues; left out of the output (default: the checkpoint's, "
                   "'a picture of ' as BLIP was trained; '' for none)")
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    p.add_argument("--top-p", type=float, default=0.9, help="sampling: keep the fewest tokens whose probability "
                   "adds up to P (default: 0.9)")
    p.add_argument("--top-k", type=int, default=0, help="sampling: keep only the K most likely tokens "
                   "(default: 0, off)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling: logits are divided by this (default: 1)")
    p.add_argument("--seed", type=int, help="sampling: random seed, for captions that repeat run to run")
    p.add_argument("--repetition-penalty", type=float, metavar="R",
                   help="R > 1 discourages repeated tokens (default: 1.1 when sampling, 1.0 otherwise, as BLIP)")
    p.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                   help="no sequence of N tokens twice in a caption, the prompt included (HF's no_repeat_ngram_size; "
                   "default: 0, off)")
    p.add_argument("--bad-words", metavar="W1,W2", default="",
                   help="comma-separated words or phrases never to write (HF's bad_words_ids, from their tokens)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass (default: 8)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default: auto, a GPU when there is one)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="weights and activations (default: auto, fp32 on CPU, bf16/fp16 on GPU)")
    p.add_argument("--format", choices=["text", "jsonl", "csv"], default="text",
                   help="text: 'PATH: caption' lines; jsonl: {\"image\": PATH, \"caption\": TEXT} lines; "
                   "csv: image,caption rows (default: text)")
    p.add_argument("--output", metavar="FILE", help="write captions to FILE instead of standard output")
    p.add_argument("--rerank", metavar="ITM_DIR",
                   help="make --candidates captions per image and print the one an image-text matching model "
                   "(a BlipRetrieval folder from convert_weights.py) scores best; jsonl/csv add its score")
    p.add_argument("--candidates", type=int, default=5, metavar="N",
                   help="with --rerank: the beam-search caption and N-1 nucleus samples (default: 5)")
    p.add_argument("--trace", action="store_true",
                   help="print (to standard error) each stage an image goes through, with its tensors' shapes")
    p.add_argument("--attention-map", metavar="OUT.png",
                   help="also draw where the decoder looked for each word (one panel per word) to OUT.png; with "
                   "several images, OUT-<image name>.png each (OUT-<n>-<image name>.png when names repeat)")
    args = p.parse_args(argv)
    if args.attention_map and not Path(args.attention_map).parent.is_dir():
        p.error(f"--attention-map: no folder {Path(args.attention_map).parent} to write into")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.candidates < 1:
        p.error("--candidates must be at least 1")
    if args.rerank and args.attention_map:
        p.error("--attention-map draws the beam caption's maps; it cannot follow a --rerank choice")
    if args.repetition_penalty is None:
        args.repetition_penalty = 1.1 if args.sample else 1.0
    config = checkpoint_config(args.checkpoint)  # unset flags take the checkpoint's values
    generation = config.generation
    args.prompt = config.prompt if args.prompt is None else args.prompt
    beams = args.beams if args.beams is not None else 1 if args.sample else generation.num_beams
    args.decode = DecodeConfig(
        max_new_tokens=generation.max_new_tokens if args.max_length is None else args.max_length,
        min_new_tokens=generation.min_new_tokens if args.min_length is None else args.min_length,
        num_beams=beams, sample=args.sample,
        top_p=args.top_p, top_k=args.top_k, temperature=args.temperature,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram,
    )
    try:
        args.decode.validate()
    except ValueError as e:
        p.error(str(e))
    args.sampling = replace(args.decode, sample=True, num_beams=1, repetition_penalty=1.1)  # --rerank's candidates
    return args


def checkpoint_config(folder) -> BlipConfig:
    """The checkpoint's config, for its prompt and decoding defaults; BLIP's when the folder cannot be
    read (main() then says why, in one line)."""
    try:
        return read_config(folder)
    except CheckpointError:
        return BlipConfig()


def expand(paths: list[str]) -> tuple[list[Path], list[str]]:
    """PATH arguments -> (image files, problems). A folder gives its images, sorted, recursively."""
    files, problems = [], []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                problems.append(f"{arg}: no images in this folder")
            files += found
        elif path.exists():
            files.append(path)
        elif glob.has_magic(arg):
            found = sorted(Path(f) for f in glob.glob(arg, recursive=True) if Path(f).is_file())
            if not found:
                problems.append(f"{arg}: no files match")
            files += found
        else:
            problems.append(f"{arg}: no such file or folder")
    return files, problems


class Writer:
    """Writes each caption as soon as it exists, so an interrupted run keeps what it did."""

    def __init__(self, out, fmt: str, scored: bool = False):
        self.out, self.fmt = out, fmt
        if fmt == "csv":
            self.csv = csv.writer(out)
            self.csv.writerow(["image", "caption", "score"] if scored else ["image", "caption"])

    def write(self, path: Path, caption: str, score: float | None = None):
        extra = {} if score is None else {"score": round(score, 6)}
        if self.fmt == "jsonl":
            self.out.write(json.dumps({"image": str(path), "caption": caption, **extra}, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            self.csv.writerow([str(path), caption, *extra.values()])
        else:
            self.out.write(f"{path}: {caption}\n")
        self.out.flush()


def rerank(captioner, matcher, image, tokens, caption: str, args, generator) -> tuple[str, float]:
    """The beam-search caption and --candidates - 1 nucleus samples (args.sampling) of one image, whose
    (1, N, C) tokens the beam search read -> the candidate the matching model scores best, and its
    score (ties: the earlier candidate, the beam's first)."""
    n = args.candidates - 1
    others = captioner.samples(tokens, n, args.prompt, args.sampling, generator) if n else []
    candidates = list(dict.fromkeys([caption, *others]))  # distinct, in order
    scores = matcher.scores(image, candidates)
    best = int(scores.argmax())
    return candidates[best], float(scores[best])


def map_paths(out: str, images: list[Path]) -> dict[Path, Path]:
    """Where --attention-map draws each image's map (PNG unless OUT names another format): OUT for
    one image; for several, OUT-<image name>.png, or OUT-<n>-<image name>.png when names repeat."""
    out = Path(out)
    suffix = out.suffix or ".png"
    if len(images) == 1:
        return {images[0]: out.with_suffix(suffix)}
    unique = len({p.stem.lower() for p in images}) == len(images)
    return {p: out.with_name(f"{out.stem}-{p.stem if unique else f'{i + 1}-{p.stem}'}{suffix}")
            for i, p in enumerate(images)}


def main(argv=None) -> int:
    args = parse_args(argv)
    files, problems = expand(args.paths)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not files:
        return 1
    if not Path(args.checkpoint).is_dir():
        print(f"error: no checkpoint folder at {args.checkpoint}; make one with "
              f"`python convert_weights.py Salesforce/blip-image-captioning-base {args.checkpoint}` "
              "(README: Real weights)", file=sys.stderr)
        return 1
    try:
        captioner = Captioner.from_pretrained(args.checkpoint, args.device, args.dtype)
        matcher = Matcher.from_pretrained(args.rerank, args.device, args.dtype) if args.rerank else None
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    words = [w.strip() for w in args.bad_words.split(",") if w.strip()]
    if words:  # each word's tokens in this checkpoint's vocabulary
        bad = tuple(tuple(captioner.tokenizer.tokens(w)) for w in words)
        args.decode, args.sampling = (replace(c, bad_words_ids=bad) for c in (args.decode, args.sampling))

    failed = len(problems)
    opened = open(args.output, "w", newline="", encoding="utf-8") if args.output else nullcontext(sys.stdout)
    generator = captioner.generator(args.seed)  # one random stream for the whole run
    map_out = map_paths(args.attention_map, files) if args.attention_map else {}
    with opened as out, tqdm(total=len(files), unit="image", disable=len(files) < 2, file=sys.stderr) as bar:
        writer = Writer(out, args.format, scored=matcher is not None)
        for start in range(0, len(files), args.batch_size):
            batch = []
            for path in files[start : start + args.batch_size]:
                try:
                    batch.append((path, load_image(path)))
                except ImageError as e:
                    tqdm.write(f"error: {e}", file=sys.stderr)
                    failed += 1
                    bar.update(1)
            if not batch:
                continue
            maps = [] if args.attention_map else None
            with Trace(captioner.model, captioner.tokenizer) if args.trace else nullcontext() as trace:
                images = [im for _, im in batch]  # encoded once when the samples of --rerank read them too
                source = captioner.encode(images) if matcher is not None else images
                captions = captioner.caption(source, args.prompt, args.decode, generator, attention=maps)
            if trace is not None:
                names = ", ".join(str(path) for path, _ in batch)
                tqdm.write("\n".join([f"trace of {names}", *trace.lines]), file=sys.stderr)
            for i, ((path, im), caption) in enumerate(zip(batch, captions, strict=True)):
                if matcher is not None:
                    caption, score = rerank(captioner, matcher, im, source[i : i + 1], caption, args, generator)
                    writer.write(path, caption, score)
                else:
                    writer.write(path, caption)
                if maps is not None:
                    draw(im, *maps[i]).save(map_out[path])
            bar.update(len(batch))
    if failed:
        print(f"{failed} of {len(files) + len(problems)} inputs could not be captioned (named above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    # every caption is written and flushed by now: skip the interpreter's teardown, which with PyTorch
    # loaded takes a third of a second (benchmarks/bench_cli.py) and has nothing left to do for us
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
