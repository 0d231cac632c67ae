"""Forward-pass speed, ours vs HF transformers, same weights, same run, printed as ratios.

    python benchmarks/bench_model.py [--size base] [--threads 2] [--repeats 5] [--plain-linear]

Captioning (vision, decoder, teacher-forced forward: BlipCaptioner against BlipForConditionalGeneration) and
image-text matching (BlipRetrieval.itm against BlipForImageTextRetrieval with use_itm_head=True).

Also prints the base vision forward against its FLOP floor: its matmul FLOPs divided by the
fastest rate this machine reaches on a GEMM of the ViT's MLP shape (PyTorch's matmul or our packed
linear), about the best any implementation could do.
"""

import argparse
import time

import torch
from common import add_common_args, apply_common_args, compare, same_weights

from blip.speed.linear import Linear


def vision_flops(v) -> float:
    """Multiply-adds x 2 of the ViT forward for one image: patch embedding, qkv, attention, proj, MLP."""
    N, C, P = v.num_tokens, v.width, v.grid**2
    patch = 2 * P * (3 * v.patch_size**2) * C
    per_block = 2 * N * C * (3 * C + C + 2 * v.mlp_dim) + 2 * 2 * N * N * C
    return patch + v.depth * per_block


def matmul_rate(N: int, C: int, H: int, repeats: int) -> float:
    """FLOP/s of an (N, C) x (C, H) product, the shape of the ViT's MLP: the faster of PyTorch's
    plain matmul and our packed linear (blip/speed/linear.py), so the floor is the best either reaches."""
    x, layer = torch.randn(N, C), Linear(C, H)
    best = float("inf")
    with torch.inference_mode():
        for fn in (lambda: x @ layer.weight.t(), lambda: layer(x)):
            for _ in range(repeats * 4):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
    return 2 * N * C * H / best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, repeats=5)
    p.add_argument("--batch", type=int, default=4, help="images per batch in the teacher-forced forward")
    p.add_argument("--tokens", type=int, default=20, help="caption tokens per image in the teacher-forced forward")
    args = p.parse_args()
    backend = apply_common_args(args)
    hf, ours = same_weights(args.size)
    config = ours.config
    v = config.vision

    one = torch.randn(1, 3, v.image_size, v.image_size)
    pixels = torch.randn(args.batch, 3, v.image_size, v.image_size)
    ids = torch.randint(1000, 30000, (args.batch, args.tokens))
    ids[:, 0] = config.text.bos_token_id
    mask = torch.ones_like(ids)
    mask[1:, args.tokens // 2:] = 0  # padded captions, as in training
    def seconds(ours_fn, hf_fn):
        return compare(ours_fn, hf_fn, args.repeats)[:2]

    with torch.inference_mode():
        image = ours.encode_image(pixels)
        rows = [
            ("vision forward, 1 image",
             *seconds(lambda: ours.encode_image(one), lambda: hf.vision_model(pixel_values=one))),
            (f"decoder forward, {args.batch} x {args.tokens} tokens (image tokens given)",
             *seconds(lambda: ours.text_decoder(ids, mask, image),
                      lambda: hf.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image))),
            (f"teacher-forced forward, {args.batch} images x {args.tokens} tokens",
             *seconds(lambda: ours(pixels, ids, mask),
                      lambda: hf(pixel_values=pixels, input_ids=ids, attention_mask=mask))),
        ]
    # the retrieval pair next, with its own weights (the captioning pair is let go)
    hf, ours = same_weights(args.size, retrieval=True)
    texts = ids.clone()
    texts[:, 0] = 101  # [CLS], as HF's processor starts texts for retrieval
    with torch.inference_mode():
        rows.append((f"ITM scoring, {args.batch} (image, text) pairs",
                     *seconds(lambda: ours.itm(pixels, texts, mask),
                              lambda: hf(input_ids=texts, pixel_values=pixels, attention_mask=mask).itm_score)))
    rate = matmul_rate(v.num_tokens, v.width, v.mlp_dim, args.repeats)
    floor = vision_flops(v) / rate

    print(f"{args.size}, {args.threads} threads, {backend}, torch {torch.__version__}, median of {args.repeats}, "
          "calls alternated")
    print(f"{'':58s} {'ours':>8s} {'HF':>8s} {'HF/ours':>8s}")
    for name, a, b in rows:
        print(f"{name:58s} {a:7.3f}s {b:7.3f}s {b / a:7.2f}x")
    print(f"vision FLOPs {vision_flops(v) / 1e9:.1f} G; matmul rate {rate / 1e9:.1f} GFLOP/s -> floor {floor:.3f}s; "
          f"ours / floor = {rows[0][1] / floor:.2f}x, HF / floor = {rows[0][2] / floor:.2f}x")


if __name__ == "__main__":
    main()
