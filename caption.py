"""Caption images with a BLIP checkpoint folder: a few photos, or a whole data set.

    python caption.py photo.jpg
    python caption.py holiday/ "scans/*.png" --format jsonl --output captions.jsonl
    python caption.py photo.jpg --sample --top-p 0.9 --seed 0 --prompt "a picture of"
    python caption.py dataset/ --sidecar                 # dataset/a.jpg -> dataset/a.txt; a rerun does the rest
    python caption.py dataset/ --format jsonl --output all.jsonl --resume   # after a kill: the rest, appended
    torchrun --nproc_per_node 4 caption.py dataset/ --sidecar              # 4 processes (GPUs), a share each

Beams, caption lengths and the prompt default to the checkpoint's own (config.json: "prompt" and
"generation"; BLIP's beam 3, 5 to 20 new tokens, "a picture of " for converted weights; train.py sets
the lengths from the captions it trained on).
"""

import argparse
import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm import tqdm

from blip.checkpoint import CheckpointError, read_config
from blip.config import BlipConfig
from blip.decoding import SAMPLING, DecodeConfig, changed
from blip.image import IMAGE_SUFFIXES, ImageError, eval_transform, load_image
from blip.speed.memory import keep_freed_memory
from blip.tool.attention_map import draw
from blip.tool.caption_plan import Plan, make_plan
from blip.tool.caption_shards import caption_shards
from blip.tool.captioner import Captioner, Matcher, rerank
from blip.tool.listing import shown
from blip.tool.outputs import EXISTING, Journal, Sidecars, Stream, drop_superseded, merge_parts, part_name, parts_of
from blip.tool.shards import shard_arguments
from blip.tool.trace import Trace

DEFAULT_CHECKPOINT = "checkpoints/blip-base"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Caption images with BLIP. PATHs are image files, folders (searched recursively for "
        f"{', '.join(sorted(IMAGE_SUFFIXES))}) or glob patterns; or shards: webdataset .tar and .parquet files of "
        "image bytes, brace patterns such as 'shards/{00000..00099}.tar' or globs, captioned into --output-dir.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or glob pattern; or shards")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, metavar="DIR",
                   help=f"checkpoint folder written by convert_weights.py or train.py (default: {DEFAULT_CHECKPOINT})")
    # the names train.py saves these defaults under, and Captioner.caption's (HF generate's); the old ones too
    p.add_argument("--num-beams", "--beams", type=int, metavar="N", dest="num_beams",
                   help="beam search width; 1 is greedy (default: the checkpoint's, BLIP's 3)")
    p.add_argument("--max-new-tokens", "--max-length", type=int, metavar="N", dest="max_new_tokens",
                   help="most new tokens per caption, the end token counting (default: the checkpoint's, BLIP's 20, "
                   "or what train.py found its captions need)")
    p.add_argument("--min-new-tokens", "--min-length", type=int, metavar="N", dest="min_new_tokens",
                   help="fewest new tokens before the caption may end (default: the checkpoint's, BLIP's 5)")
    p.add_argument("--prompt", metavar="TEXT",
                   help="text the caption continues; left out of the output (default: the checkpoint's, "
                   "'a picture of ' as BLIP was trained; '' for none)")
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    p.add_argument("--top-p", type=float, help="sampling: keep the fewest tokens whose probability "
                   f"adds up to P (default: {SAMPLING['top_p']:g}, as BLIP)")
    p.add_argument("--top-k", type=int, default=0, help="sampling: keep only the K most likely tokens "
                   "(default: 0, off)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling: logits are divided by this (default: 1)")
    p.add_argument("--seed", type=int, help="sampling: random seed, for captions that repeat run to run")
    p.add_argument("--repetition-penalty", type=float, metavar="R",
                   help=f"R > 1 discourages repeated tokens (default: {SAMPLING['repetition_penalty']:g} when "
                   "sampling, 1.0 otherwise, as BLIP)")
    p.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                   help="no sequence of N tokens twice in a caption, the prompt included (HF's no_repeat_ngram_size; "
                   "default: 0, off)")
    p.add_argument("--bad-words", metavar="W1,W2", default="",
                   help="comma-separated words or phrases never to write (HF's bad_words_ids, from their tokens)")
    # 16: a decoding step reads all of the decoder's weights whatever the batch, so more pictures per step share
    # that read (base, fp32, 2-core Xeon: 0.40-0.42 s of decoding per photo at 16, 0.49-0.54 at 8, 0.38-0.40 at 32)
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per forward pass (default: 16)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (default: auto, a GPU when there is one)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="weights and activations (default: auto, fp32 on CPU, bf16/fp16 on GPU)")
    p.add_argument("--format", choices=["text", "jsonl", "csv", "parquet"],
                   help="text: 'PATH: caption' lines; jsonl: {\"image\": PATH, \"caption\": TEXT} lines; "
                   "csv: image,caption rows (default: text); shards: parquet (default) or jsonl, with the key "
                   "in place of PATH")
    p.add_argument("--output", metavar="FILE", help="write captions to FILE instead of standard output (an existing "
                   "FILE is refused unless --resume)")
    p.add_argument("--resume", action="store_true", help="with --output FILE (jsonl or csv): skip the pictures FILE "
                   "holds a caption of, append the rest")
    p.add_argument("--sidecar", nargs="?", const=".txt", metavar="EXT",
                   help="write each caption to a file beside its picture, photo.jpg -> photo.EXT (default EXT: .txt); "
                   "written whole or not at all")
    p.add_argument("--output-dir", metavar="DIR", help="with --sidecar: caption files go under DIR, at each picture's "
                   "place in the folder it was found in; with shards: DIR/<shard>.parquet (or .jsonl) per shard, "
                   "written whole once the shard is captioned (a rerun skips the shards that have one)")
    p.add_argument("--existing", choices=EXISTING, default="skip",
                   help="with --sidecar, a picture whose caption file exists: skip it (default: a rerun does only what "
                   "is left), overwrite the file, or append / prepend the new caption to it (a journal, "
                   ".caption-MODE.EXT.journal in the first folder, lets the rerun after a kill skip what is done)")
    p.add_argument("--hidden", action="store_true", help="also look in hidden folders and files (names that start "
                   "with '.', such as .ipynb_checkpoints), which are skipped by default")
    p.add_argument("--separator", default="\n", metavar="TEXT", help="between the old and new caption for "
                   "--existing append/prepend (default: a new line: a caption per line, as train.py reads them)")
    p.add_argument("--prefix", default="", metavar="TEXT", help="text put before every caption written")
    p.add_argument("--suffix", default="", metavar="TEXT", help="text put after every caption written")
    p.add_argument("--workers", type=int, metavar="N", help="processes that read and resize pictures while the model "
                   "works (default: 0 for one batch, else 1 on the CPU, up to 8 with a GPU)")
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
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.attention_map and not Path(args.attention_map).parent.is_dir():
        p.error(f"--attention-map: no folder {Path(args.attention_map).parent} to write into")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.workers is not None and args.workers < 0:
        p.error("--workers must not be negative")
    if args.sidecar and "." + args.sidecar.lstrip(".").lower() in IMAGE_SUFFIXES:
        p.error(f"--sidecar {args.sidecar} would write each caption over a picture: give a text suffix, such as .txt")
    if args.sidecar and args.output:
        p.error("--sidecar writes a caption file per picture; give it or --output FILE, not both")
    args.shards, pictures = shard_arguments(args.paths)
    if args.shards:
        check_shard_args(p, args, pictures)
    elif args.format == "parquet":
        p.error("--format parquet is for shard inputs (tar or parquet files) and their --output-dir")
    elif args.output_dir and not args.sidecar:
        p.error("--output-dir is where --sidecar's caption files (or shard inputs' outputs) go: add --sidecar")
    args.format = args.format or "text"
    if args.resume and not (args.output and args.format in ("jsonl", "csv")):
        p.error("--resume continues an --output FILE in jsonl or csv (--sidecar runs skip finished pictures "
                "by themselves)")
    if args.output and Path(args.output).exists() and not args.resume:
        p.error(f"{args.output} exists: add --resume to caption only the pictures it lacks, or choose another --output")
    if args.output and parts_of(args.output) and not args.resume:
        p.error(f"{parts_of(args.output)[0]} holds captions of an interrupted torchrun run: add --resume to continue "
                "it, or remove the .part files")
    if args.candidates < 1:
        p.error("--candidates must be at least 1")
    if args.rerank and args.attention_map:
        p.error("--attention-map draws the beam caption's maps; it cannot follow a --rerank choice")
    config = checkpoint_config(args.checkpoint)  # unset flags take the checkpoint's values
    generation = config.generation
    args.prompt = config.prompt if args.prompt is None else args.prompt
    given = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
             "top_p": args.top_p, "repetition_penalty": args.repetition_penalty}
    args.decode = changed(DecodeConfig(**asdict(generation)), **{k: v for k, v in given.items() if v is not None},
                          sample=args.sample, top_k=args.top_k, temperature=args.temperature,
                          no_repeat_ngram_size=args.no_repeat_ngram)
    try:
        args.decode.validate()
    except ValueError as e:
        p.error(str(e))
    args.sampling = replace(args.decode, sample=True, num_beams=1, repetition_penalty=1.1)  # --rerank's candidates
    return args


def check_shard_args(p, args, pictures: list[str]):
    """Shards (tar or parquet files) are captioned into an output per shard in --output-dir, nothing else."""
    if pictures:
        p.error(f"give shards (tar or parquet files) or pictures in one run, not both: {pictures[0]} is not a shard")
    if not args.output_dir:
        p.error("shards are captioned into an output per shard: add --output-dir DIR")
    for flag, given in (("--sidecar", args.sidecar), ("--output", args.output), ("--resume", args.resume),
                        ("--attention-map", args.attention_map), ("--trace", args.trace)):
        if given:
            p.error(f"{flag} is for pictures, not shards (their captions go to --output-dir, and a rerun "
                    "skips the shards done)")
    if args.format not in (None, "parquet", "jsonl"):
        p.error(f"shard outputs are parquet or jsonl, not {args.format}")
    args.format = args.format or "parquet"


def checkpoint_config(folder) -> BlipConfig:
    """The checkpoint's config, for its prompt and decoding defaults; BLIP's when the folder cannot be
    read (main() then says why, in one line)."""
    try:
        return read_config(folder)
    except CheckpointError:
        return BlipConfig()


class Pictures(torch.utils.data.Dataset):
    """Image files -> (index, (3, size, size) pixels) or (index, error message): what the DataLoader's
    worker processes read, decode and resize while the model captions the batch before."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, eval_transform(load_image(self.files[i]), self.size)
        except ImageError as e:
            return i, str(e)


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


def distributed() -> tuple[int, int]:
    """(rank, world size): under torchrun, each process captions every world-th picture of rank 0's plan."""
    if "RANK" not in os.environ:
        return 0, 1
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # each batch reuses the last one's memory: fewer page faults (blip/speed/memory.py)
    rank, world = distributed()
    plan = make_plan(args) if rank == 0 else None  # rank 0 lists and decides; the others get its plan
    if world > 1:
        import torch.distributed as dist

        box = [replace(plan, earlier=[]) if plan else None]
        dist.broadcast_object_list(box, src=0)
        plan = plan or box[0]
    if plan.stop is not None:
        return plan.stop
    mine = plan.todo[rank::world]  # this process's share
    journal = Journal(plan.journal) if plan.journal else None
    on_term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a polite kill stops like Ctrl-C
    try:
        failed = caption_share(args, mine, journal, master=rank == 0, world=world) if mine else 0
    except KeyboardInterrupt:
        print("interrupted: every caption made so far is written; run again to do the rest"
              + (" (with --resume)" if args.output and not args.sidecar else ""), file=sys.stderr)
        return 130
    except CheckpointError as e:  # the checkpoint cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, on_term)
    if world > 1:
        import torch.distributed as dist

        total = torch.tensor([failed])
        dist.all_reduce(total)  # every part is written, too
        failed = int(total)
    if rank == 0:
        failed += plan.failed
        finish(args, plan, world, failed)
    return 1 if failed else 0


def caption_share(args, mine: list, journal, master: bool, world: int) -> int:
    """Caption this process's pictures and write their captions; returns how many failed."""
    try:
        captioner = Captioner.from_pretrained(args.checkpoint, args.device, args.dtype)
        matcher = Matcher.from_pretrained(args.rerank, args.device, args.dtype) if args.rerank else None
    except (ValueError, OSError) as e:  # a folder that is not a checkpoint, a device that is not there
        raise CheckpointError(str(e)) from e
    words = [w.strip() for w in args.bad_words.split(",") if w.strip()]
    if words:  # each word's tokens in this checkpoint's vocabulary
        bad = tuple(tuple(captioner.tokenizer.tokens(w)) for w in words)
        args.decode, args.sampling = (replace(c, bad_words_ids=bad) for c in (args.decode, args.sampling))
    if args.shards:  # whole shards, each into its own output
        # a reader process reads whole shards: no more of them than shards
        workers = min(readers(captioner), len(mine)) if args.workers is None else args.workers
        return caption_shards(args, mine, captioner, matcher, workers, master)
    sidecars = Sidecars(args.sidecar, args.existing, args.separator, args.output_dir) if args.sidecar else None
    if sidecars is not None or not args.output:
        opened = nullcontext(sys.stdout)
    elif world > 1:  # each process its own part, merged in input order at the end
        opened = open(part_name(args.output, int(os.environ["RANK"])), "w", newline="", encoding="utf-8")
    else:
        opened = open(args.output, "a" if args.resume else "w", newline="", encoding="utf-8")
    generator = captioner.generator(args.seed)  # one random stream for the whole run
    map_out = map_paths(args.attention_map, [path for path, _ in mine]) if args.attention_map else {}
    workers = args.workers if args.workers is not None else default_workers(len(mine), args.batch_size, captioner)
    loader = torch.utils.data.DataLoader(Pictures([path for path, _ in mine], captioner.image_size),
                                         batch_size=args.batch_size, num_workers=workers, collate_fn=list)
    failed = 0
    with opened as out, tqdm(total=len(mine), unit="picture", disable=len(mine) < 2 or not master,
                             file=sys.stderr, dynamic_ncols=True) as bar:
        stream = Stream(out, args.format, scored=matcher is not None,
                        header=not (out is not sys.stdout and out.tell() > 0))
        write = (lambda path, root, text, score: sidecars.write(path, root, text, journal)) if sidecars else \
            (lambda path, root, text, score: stream.write(path, text, score))
        for batch in loader:
            good = [(i, pixels) for i, pixels in batch if torch.is_tensor(pixels)]
            for i, error in batch:
                if not torch.is_tensor(error):
                    tqdm.write(f"error: {error}", file=sys.stderr)
                    stream.fail(mine[i][0], error)
                    failed += 1
            if good:
                failed += caption_batch(captioner, matcher, [mine[i] for i, _ in good],
                                        torch.stack([p for _, p in good]), args, generator, stream, write, map_out)
            bar.update(len(batch))
    return failed


def finish(args, plan: Plan, world: int, failed: int):
    """Rank 0, once every process is done: the parts into FILE, error records that a later caption of
    the same picture replaces dropped, the journal removed when nothing failed, and the count of failures."""
    if args.output and not args.sidecar:
        if world > 1:
            merge_parts(Path(args.output), args.format, plan.todo, plan.earlier)
        drop_superseded(Path(args.output), args.format)
    if plan.journal is not None and Path(plan.journal).is_file():
        if failed:
            print(f"the journal {shown(plan.journal)} names the pictures done: the same command again tries "
                  "the rest; remove it to start over", file=sys.stderr)
        else:
            Journal(plan.journal).remove()
    if failed and args.shards:
        print(f"{failed} samples or shards could not be captioned (named above; a bad sample in its shard's output "
              "too; a shard without output is tried again by a rerun)", file=sys.stderr)
    elif failed:
        print(f"{failed} of {plan.inputs} inputs could not be captioned (named above)", file=sys.stderr)


def caption_batch(captioner, matcher, batch, pixels, args, generator, stream, write, map_out) -> int:
    """Caption one batch of pictures ((path, root) and their pixels) and write the captions; returns
    how many failed (an empty caption is a failure: no empty caption file is ever written)."""
    maps = [] if args.attention_map else None
    with Trace(captioner.model, captioner.tokenizer) if args.trace else nullcontext() as trace:
        tokens = captioner.encode(pixels)  # once, for the beam search and --rerank's samples
        captions = captioner.caption(tokens, args.prompt, args.decode, generator, attention=maps)
    if trace is not None:
        names = ", ".join(shown(path) for path, _ in batch)
        tqdm.write("\n".join([f"trace of {names}", *trace.lines]), file=sys.stderr)
    failed = 0
    for i, ((path, root), caption) in enumerate(zip(batch, captions, strict=True)):
        score = None
        if matcher is not None:
            caption, score = rerank(captioner, matcher, path, tokens[i : i + 1], caption, args.prompt,
                                        args.sampling, args.candidates, generator)
        text = f"{args.prefix}{caption}{args.suffix}"
        if not text.strip():
            tqdm.write(f"error: {shown(path)}: the model wrote an empty caption", file=sys.stderr)
            stream.fail(path, "empty caption")
            failed += 1
        else:
            write(path, root, text, score)
        if maps is not None:
            draw(load_image(path), *maps[i]).save(map_out[path])
    return failed


def default_workers(n: int, batch_size: int, captioner) -> int:
    """Processes that read and resize pictures while the model works: none for a single batch (starting
    one costs more than it saves), else `readers`."""
    return 0 if n <= batch_size else readers(captioner)


def readers(captioner) -> int:
    """One reader process on the CPU (the model's threads want the cores), several for a GPU, which a single
    process could not keep fed."""
    return 1 if captioner.device.type == "cpu" else min(8, os.cpu_count() or 1)


if __name__ == "__main__":
    code = main()
    # every caption is written and flushed by now: skip the interpreter's teardown, which with PyTorch
    # loaded takes a third of a second (benchmarks/bench_cli.py) and has nothing left to do for us
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
