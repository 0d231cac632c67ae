"""Caption shards on a Ray cluster, for machines without a shared file system: Ray Data reads the webdataset
tar and parquet shards, one BLIP model per actor (CPU or GPU) captions them (blip/tool/batch_captioner.py),
and the captions are written as parquet (key, caption, error).

    pip install "ray[data]"                                   # an extra: not in requirements.txt
    python caption_ray.py "shards/{00000..00099}.tar" --output-dir captions/            # a local Ray instance
    python caption_ray.py "s3://bucket/shards/{00000..00999}.tar" --output-dir s3://bucket/captions \\
        --address auto --actors 16 --gpus-per-actor 1 --dtype bf16                      # a running cluster

On one machine with a shared file system, caption.py does the same with an output per shard and resumes
by shard (docs/captioning.md); Ray Data writes its own file names and retries failed tasks itself.
"""

import argparse
import glob
import sys

from blip.tool.batch_captioner import BatchCaptioner
from blip.tool.shards import expand_braces


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="SHARD", help="tar or parquet files, brace patterns or globs of them "
                   "(local paths, or any URL Ray Data reads: s3://, gs://)")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="where the parquet files of captions go")
    p.add_argument("--checkpoint", default="checkpoints/blip-base", metavar="DIR",
                   help="checkpoint folder, readable by every actor (default: checkpoints/blip-base)")
    p.add_argument("--address", help="Ray cluster to join ('auto': the one this machine belongs to; default: start "
                   "a local Ray instance)")
    p.add_argument("--actors", type=int, default=1, metavar="N", help="model copies captioning at once (default: 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0, metavar="G", help="GPUs each actor holds (default: 0, "
                   "the CPU)")
    p.add_argument("--cpus-per-actor", type=float, default=1, metavar="C", help="CPUs each actor holds (default: 1)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per forward pass (default: 16)")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="weights and activations (default: auto, fp32 on CPU, bf16/fp16 on GPU)")
    p.add_argument("--num-beams", type=int, metavar="N", help="beam width (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="most new tokens (default: the checkpoint's)")
    p.add_argument("--prompt", metavar="TEXT", help="text the caption continues (default: the checkpoint's)")
    return p


def shard_files(paths: list[str]) -> tuple[list[str], list[str]]:
    """(tar files, parquet files): brace patterns expanded, local globs matched, URLs as given."""
    tars, parquets = [], []
    for arg in paths:
        for pattern in expand_braces(arg):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) and "://" not in pattern else [pattern]
            for m in matches:
                (tars if m.lower().endswith(".tar") else parquets).append(m)
    return tars, parquets


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import ray
    except ImportError:
        print('error: caption_ray.py needs Ray: pip install "ray[data]"', file=sys.stderr)
        return 1
    tars, parquets = shard_files(args.paths)
    if not tars and not parquets:
        print("error: no shards match", file=sys.stderr)
        return 1
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    decoding = {k: v for k, v in (("num_beams", args.num_beams), ("max_new_tokens", args.max_new_tokens)) if v}
    read = [ray.data.read_webdataset(tars, decoder=None)] if tars else []
    read += [ray.data.read_parquet(parquets)] if parquets else []
    for ds in read:  # one kind at a time: their columns differ
        captions = ds.map_batches(BatchCaptioner, batch_size=args.batch_size, batch_format="numpy",
                                  concurrency=args.actors, num_gpus=args.gpus_per_actor, num_cpus=args.cpus_per_actor,
                                  fn_constructor_kwargs={"checkpoint": args.checkpoint, "dtype": args.dtype,
                                                         "device": "cuda" if args.gpus_per_actor else "cpu",
                                                         "prompt": args.prompt, **decoding})
        captions.write_parquet(args.output_dir)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
