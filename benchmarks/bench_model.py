"""Forward-pass speed, ours vs HF transformers, same weights, same run, printed as ratios.

    python benchmarks/bench_model.py [--size base] [--threads 2] [--repeats 5]

Also prints the base vision forward against its FLOP floor: its matmul FLOPs divided by the
rate this machine reaches on a GEMM of the same shape (the best any implementation could do).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from blip import BlipCaptioner  # noqa: E402
from blip.convert import HF, OURS, config_from_hf, rename  # noqa: E402


def timeit(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def vision_flops(v) -> float:
    """Multiply-adds x 2 of the ViT forward for one image: patch embedding, qkv, attention, proj, MLP."""
    N, C, P = v.num_tokens, v.width, v.grid**2
    patch = 2 * P * (3 * v.patch_size**2) * C
    per_block = 2 * N * C * (3 * C + C + 2 * v.mlp_dim) + 2 * 2 * N * N * C
    return patch + v.depth * per_block


def matmul_rate(N: int, C: int, H: int, repeats: int) -> float:
    """FLOP/s of an (N, C) x (C, H) matmul, the shape of the ViT's MLP."""
    a, b = torch.randn(N, C), torch.randn(C, H)
    return 2 * N * C * H / min(timeit(lambda: a @ b, 1) for _ in range(repeats * 4))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["base", "large"], default="base", help="model size to build (random weights)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the CI machine has 2 cores)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median reported)")
    p.add_argument("--batch", type=int, default=4, help="images per batch in the teacher-forced forward")
    p.add_argument("--tokens", type=int, default=20, help="caption tokens per image in the teacher-forced forward")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import BlipConfig, BlipForConditionalGeneration

    if args.size == "base":
        hf_cfg = BlipConfig(text_config={"num_attention_heads": 12})
    else:
        hf_cfg = BlipConfig(text_config={"num_attention_heads": 12},
                            vision_config={"hidden_size": 1024, "intermediate_size": 4096,
                                           "num_hidden_layers": 24, "num_attention_heads": 16})
    hf = BlipForConditionalGeneration(hf_cfg).eval()
    config = config_from_hf(hf_cfg.to_dict(), "bench")
    ours = BlipCaptioner(config).eval()
    ours.load_state_dict(rename(hf.state_dict(), HF, OURS, "bench"), strict=True)
    v = config.vision

    one = torch.randn(1, 3, v.image_size, v.image_size)
    pixels = torch.randn(args.batch, 3, v.image_size, v.image_size)
    ids = torch.randint(1000, 30000, (args.batch, args.tokens))
    ids[:, 0] = config.text.bos_token_id
    mask = torch.ones_like(ids)
    mask[1:, args.tokens // 2:] = 0  # padded captions, as in training
    with torch.inference_mode():
        image = ours.encode_image(pixels)
        rows = [
            ("vision forward, 1 image",
             timeit(lambda: ours.encode_image(one), args.repeats),
             timeit(lambda: hf.vision_model(pixel_values=one), args.repeats)),
            (f"decoder forward, {args.batch} x {args.tokens} tokens (image tokens given)",
             timeit(lambda: ours.text_decoder(ids, mask, image), args.repeats),
             timeit(lambda: hf.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image),
                    args.repeats)),
            (f"teacher-forced forward, {args.batch} images x {args.tokens} tokens",
             timeit(lambda: ours(pixels, ids, mask), args.repeats),
             timeit(lambda: hf(pixel_values=pixels, input_ids=ids, attention_mask=mask), args.repeats)),
        ]
    rate = matmul_rate(v.num_tokens, v.width, v.mlp_dim, args.repeats)
    floor = vision_flops(v) / rate

    print(f"{args.size}, {args.threads} threads, torch {torch.__version__}, median of {args.repeats}")
    print(f"{'':58s} {'ours':>8s} {'HF':>8s} {'HF/ours':>8s}")
    for name, a, b in rows:
        print(f"{name:58s} {a:7.3f}s {b:7.3f}s {b / a:7.2f}x")
    print(f"vision FLOPs {vision_flops(v) / 1e9:.1f} G; matmul rate {rate / 1e9:.1f} GFLOP/s -> floor {floor:.3f}s; "
          f"ours / floor = {rows[0][1] / floor:.2f}x, HF / floor = {rows[0][2] / floor:.2f}x")


if __name__ == "__main__":
    main()
