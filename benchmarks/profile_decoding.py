"""Where decoding's time goes: `torch.profiler` over one beam search of a batch of images at base size (random
weights, every caption exactly --tokens new tokens), the image already encoded; ops by their own time.

    python benchmarks/profile_decoding.py [--batch 16] [--beams 3] [--tokens 20] [--threads 2] [--shapes]
"""

import argparse
import time

import torch
from common import add_common_args, apply_common_args

from blip import BlipCaptioner
from blip.config import PRESETS
from blip.decoding import DecodeConfig, generate_from


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, repeats=3)
    p.add_argument("--batch", type=int, default=16, help="images decoded together (caption.py's default: 16)")
    p.add_argument("--beams", type=int, default=3, help="beam width (BLIP's: 3)")
    p.add_argument("--tokens", type=int, default=20, help="new tokens per caption")
    p.add_argument("--shapes", action="store_true", help="group the ops by their input shapes too")
    args = p.parse_args()
    backend = apply_common_args(args)
    torch.manual_seed(0)
    model = BlipCaptioner(PRESETS[args.size]()).eval()
    cfg = DecodeConfig(num_beams=args.beams, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    prompt = [model.config.text.bos_token_id]
    with torch.inference_mode():
        image = model.encode_image(torch.randn(args.batch, 3, 384, 384))  # (B, N, C)
        generate_from(model, image, prompt, cfg)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            generate_from(model, image, prompt, cfg)
            times.append(time.perf_counter() - start)
        with torch.profiler.profile(record_shapes=args.shapes) as prof:
            generate_from(model, image, prompt, cfg)
    print(f"{args.size}, {args.batch} images x beam {args.beams}, {args.tokens} new tokens, {args.threads} threads, "
          f"{backend}: {min(times):.3f}-{max(times):.3f} s a batch ({args.repeats} runs; the profiled one below is "
          "slower by the profiler's own work)")
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
