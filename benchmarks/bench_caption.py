"""Captioning speed, ours vs HF `generate`, same weights, same run, printed as ratios.

    python benchmarks/bench_caption.py [--size base] [--threads 2] [--repeats 3] [--device cpu] [--dtype fp32]
                                       [--plain-linear]

Exactly `--tokens` new tokens per caption (min = max), so both sides do the same work. Each
measurement is the median of --repeats calls after a warm-up, ours and HF alternated; the ids of both sides are checked
equal (fp32) so the comparison is of the same computation.
"""

import argparse

import torch
from common import add_common_args, apply_common_args, compare, same_weights

from blip.decoding import DecodeConfig, generate
from blip.tool.captioner import DTYPES


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, repeats=3)
    p.add_argument("--tokens", type=int, default=20, help="new tokens per caption")
    p.add_argument("--batch", type=int, default=8, help="images in the beam-search batch")
    p.add_argument("--beams", type=int, default=3, help="beam width of the batched measurement")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and activations of both sides")
    args = p.parse_args()
    backend = apply_common_args(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    hf, ours = same_weights(args.size)
    hf, ours = hf.to(device, dtype), ours.to(device, dtype)
    size = ours.config.vision.image_size
    dec = ours.config.text.bos_token_id

    rows = []
    for name, n, beams in [(f"{args.batch} images x beam {args.beams}", args.batch, args.beams),
                           ("1 image, greedy", 1, 1)]:
        pixels = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        cfg = DecodeConfig(num_beams=beams, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
        with torch.inference_mode():
            t_ours, t_hf, ids, out = compare(
                lambda: generate(ours, pixels, [dec], cfg),  # noqa: B023
                lambda: hf.generate(pixel_values=pixels, num_beams=beams,  # noqa: B023
                                    max_new_tokens=args.tokens, min_new_tokens=args.tokens),
                args.repeats, device)
        same = ids == out[:, 1:].tolist()
        rows.append((name, t_ours, t_hf, same))

    print(f"{args.size}, {args.device} {args.dtype}, {args.threads} threads, {args.tokens} new tokens, {backend}, "
          f"torch {torch.__version__}, median of {args.repeats}, calls alternated")
    print(f"{'':24s} {'ours':>8s} {'HF':>8s} {'HF/ours':>8s}  same ids")
    for name, a, b, same in rows:
        print(f"{name:24s} {a:7.3f}s {b:7.3f}s {b / a:7.2f}x  {same}")


if __name__ == "__main__":
    main()
