"""What backward keeps (blip/speed/recompute.py), checked on a device: "elementwise" gives the gradients of plain
autograd, with text dropout on (on CUDA the fused attention kernels draw random numbers, which the
recomputation must replay in order) and under bf16 autocast.

    python benchmarks/check_recompute.py [--device cuda]
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from blip import BlipCaptioner  # noqa: E402
from blip.config import tiny  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cpu (default: cuda)")
    device = torch.device(p.parse_args().device)
    config = tiny()
    torch.manual_seed(0)
    model = BlipCaptioner(replace(config, text=replace(config.text, dropout=0.1))).to(device).train()
    pixels = torch.randn(8, 3, 64, 64, device=device)
    ids = torch.randint(4, 1000, (8, 12), device=device)
    ids[:, 0] = config.text.bos_token_id
    grads = {}
    for mode in ("none", "elementwise"):
        model.set_recompute(mode)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks for both
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model.loss(pixels, ids)
        loss.backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    same = all(torch.equal(a, b) for a, b in zip(grads["none"], grads["elementwise"], strict=True))
    print(f"recompute elementwise, dropout 0.1, bf16 autocast, {device}: same gradients as plain autograd: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
