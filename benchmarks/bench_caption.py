"""Captioning speed, ours vs HF `generate`, same weights, same run, printed as ratios.

    python benchmarks/bench_caption.py [--size base] [--threads 2] [--repeats 3] [--device cpu] [--dtype fp32]

Exactly `--tokens` new tokens per caption (min = max), so both sides do the same work. Each
measurement is the median of --repeats calls after a warm-up; the ids of both sides are checked
equal (fp32) so the comparison is of the same computation.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from blip import BlipCaptioner  # noqa: E402
from blip.captioner import DTYPES  # noqa: E402
from blip.convert import HF, OURS, config_from_hf, rename  # noqa: E402
from blip.decoding import DecodeConfig, generate  # noqa: E402


def timeit(fn, repeats: int, device) -> tuple[float, object]:
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["base", "large"], default="base", help="model size (random weights)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the CI machine has 2 cores)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    p.add_argument("--tokens", type=int, default=20, help="new tokens per caption")
    p.add_argument("--batch", type=int, default=8, help="images in the beam-search batch")
    p.add_argument("--beams", type=int, default=3, help="beam width of the batched measurement")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and activations of both sides")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    from transformers import BlipConfig, BlipForConditionalGeneration

    vision = {} if args.size == "base" else {"hidden_size": 1024, "intermediate_size": 4096,
                                             "num_hidden_layers": 24, "num_attention_heads": 16}
    hf_cfg = BlipConfig(text_config={"num_attention_heads": 12}, vision_config=vision)
    hf = BlipForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # HF's ViT init is ~0; give it weights that make images differ
        for p_ in hf.vision_model.parameters():
            p_.normal_(0, 0.02)
    ours = BlipCaptioner(config_from_hf(hf_cfg.to_dict(), "bench")).eval()
    ours.load_state_dict(rename(hf.state_dict(), HF, OURS, "bench"), strict=True)
    hf, ours = hf.to(device, dtype), ours.to(device, dtype)
    size = ours.config.vision.image_size
    dec = ours.config.text.bos_token_id

    rows = []
    for name, n, beams in [(f"{args.batch} images x beam {args.beams}", args.batch, args.beams),
                           ("1 image, greedy", 1, 1)]:
        pixels = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        cfg = DecodeConfig(num_beams=beams, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
        with torch.inference_mode():
            t_ours, ids = timeit(lambda: generate(ours, pixels, [dec], cfg), args.repeats, device)  # noqa: B023
            t_hf, out = timeit(lambda: hf.generate(pixel_values=pixels, num_beams=beams,  # noqa: B023
                                                   max_new_tokens=args.tokens, min_new_tokens=args.tokens),
                               args.repeats, device)
        same = ids == out[:, 1:].tolist()
        rows.append((name, t_ours, t_hf, same))

    print(f"{args.size}, {args.device} {args.dtype}, {args.threads} threads, {args.tokens} new tokens, "
          f"torch {torch.__version__}, median of {args.repeats}")
    print(f"{'':24s} {'ours':>8s} {'HF':>8s} {'HF/ours':>8s}  same ids")
    for name, a, b, same in rows:
        print(f"{name:24s} {a:7.3f}s {b:7.3f}s {b / a:7.2f}x  {same}")


if __name__ == "__main__":
    main()
