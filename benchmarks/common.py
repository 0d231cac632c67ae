"""What both benchmarks share: timing, and an HF model and ours holding the same random weights."""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from blip import BlipCaptioner
from blip.speed import linear  # noqa: E402
from blip.tool.convert import config_from_hf  # noqa: E402
from blip.tool.names import HF, OURS, rename  # noqa: E402

LARGE_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}


def add_common_args(p, repeats: int):
    """The flags both benchmarks take."""
    p.add_argument("--size", choices=["base", "large"], default="base", help="model size to build (random weights)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the CI machine has 2 cores)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed calls per measurement (median reported)")
    p.add_argument("--plain-linear", action="store_true",
                   help="run our linears as plain F.linear, without the packed oneDNN CPU path (blip/speed/linear.py)")
    p.add_argument("--packed-linear", action="store_true",
                   help="run the packed oneDNN CPU path also where it is not the default (Intel CPUs)")


def apply_common_args(args):
    """Thread count and linear backend, as the flags say."""
    torch.set_num_threads(args.threads)
    if args.plain_linear or args.packed_linear:
        linear.ONEDNN = args.packed_linear and linear.AVAILABLE
    return "plain F.linear" if not linear.ONEDNN else "packed oneDNN linear"


def compare(ours, theirs, repeats: int, device: torch.device | None = None):
    """Median seconds of `ours()` and `theirs()`, calls alternated so that drift in the machine's
    speed hits both alike; one warm-up call each. Returns (t_ours, t_theirs, out_ours, out_theirs)."""
    (t_ours, t_theirs), (out_ours, out_theirs) = alternate([ours, theirs], repeats, device)
    return t_ours, t_theirs, out_ours, out_theirs


def alternate(fns, repeats: int, device: torch.device | None = None):
    """`compare` for any number of callables: (median seconds of each, last output of each)."""
    cuda = device is not None and device.type == "cuda"
    out = [fn() for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out[i] = fn()
            if cuda:
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times], out


def hf_model(size: str = "base", retrieval: bool = False):
    """An HF BlipForConditionalGeneration (or BlipForImageTextRetrieval) with seeded random weights."""
    import transformers

    hf_class = transformers.BlipForImageTextRetrieval if retrieval else transformers.BlipForConditionalGeneration
    torch.manual_seed(0)
    vision = {} if size == "base" else LARGE_VISION
    hf = hf_class(transformers.BlipConfig(text_config={"num_attention_heads": 12}, vision_config=vision)).eval()
    with torch.no_grad():  # HF initialises the ViT near zero; make image tokens differ by image
        for p in hf.vision_model.parameters():
            p.normal_(0, 0.02)
    return hf


def same_weights(size: str = "base", retrieval: bool = False):
    """(HF model, ours) with random weights, identical values: BlipForConditionalGeneration and our
    BlipCaptioner, or with retrieval BlipForImageTextRetrieval and our BlipRetrieval."""
    from blip import BlipRetrieval
    from blip.tool.names import CAPTIONER, RETRIEVAL

    ours_class, layout = (BlipRetrieval, RETRIEVAL) if retrieval else (BlipCaptioner, CAPTIONER)
    hf = hf_model(size, retrieval)
    ours = ours_class(config_from_hf(hf.config.to_dict(), "benchmark")).eval()  # embed_dim included
    ours.load_state_dict(rename(hf.state_dict(), HF, OURS, "benchmark", layout), strict=True)
    return hf, ours
