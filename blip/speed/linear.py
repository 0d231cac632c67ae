"""The linear layer every projection in the model uses: `nn.Linear`, with a faster CPU path for inference.

PyTorch's CPU `F.linear` runs fp32 on MKL. oneDNN (bundled with PyTorch; its compiler uses it for
the same purpose) runs the same product on weights it has re-laid out once ("packed") for its
kernels. On the AMD EPYC (AVX-512) machines this project is measured on, that is 2-5x faster, from
the few rows of a decoding step to the 577-token rows of a ViT forward (`benchmarks/*.py
--plain-linear` shows the difference); on Intel CPUs it is not (`ONEDNN` below). So on other CPUs,
when no gradient is being recorded, a fp32 CPU linear packs its weight on first use, keeps the
packed copy and repacks it whenever the weight changes. A loaded checkpoint's weights are its
file's pages: once a weight is packed, those pages are given back to the kernel (blip/speed/memory.py),
so the weights are in memory once, packed, not twice. Everywhere else (training, CUDA, other
dtypes, autocast) it is plain `F.linear`. Same maths; the summation order differs, so results agree with
`F.linear` to fp32 rounding, not bit for bit.

The packed path runs in eval mode only, and the packed copy is dropped whenever the module switches
between training and eval mode: fused optimizers (AdamW(fused=True), which train.py uses) update
weights in place without moving their version counters, so a copy kept across training would be stale.
"""

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .memory import drop_file_pages


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


# Where the packed path runs. MKL, which runs PyTorch's F.linear on x86, takes its fastest kernels on
# Intel CPUs only: there the packed path measured no faster (8 photos x beam 3: 5.48 s against 5.55 s on
# a Xeon with AVX-512 and AMX), slower for one photo (1.15 s against 0.94 s: packing is first-call work),
# while it holds the second copy of the weights. Packing the text model's weights alone there speeds up
# decoding's few-row products (a batch of 16 at beam 3: 3.18-3.32 s against 3.38-3.46 s), but not a whole
# caption.py run of 64 photos (median of 2: 39.6 s against 39.8 s) and it raised the peak RSS (2.94 against 2.68 GB).
# So: packed on other CPUs (AMD EPYC: 2-5x), plain F.linear on Intel's. ONEDNN = False turns it off
# everywhere, True on wherever PyTorch has it (benchmarks, tests).
AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN = AVAILABLE and _cpu_vendor() != "GenuineIntel"


class PackedWeight(nn.Module):
    """A weight matrix packed for oneDNN, repacked when the weight is replaced or changed in place,
    dropped when the owner switches between training and eval mode. Holds no parameters."""

    def __init__(self):
        super().__init__()
        self.packed = None
        self.key = None  # (weakref to the weight, its storage address, its version counter)

    def train(self, mode: bool = True):
        self.packed = self.key = None
        return super().train(mode)

    def of(self, weight: torch.Tensor) -> torch.Tensor:
        key = self.key
        if key is None or key[0]() is not weight or key[1:] != (weight.data_ptr(), weight._version):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
            self.key = (weakref.ref(weight), weight.data_ptr(), weight._version)
            drop_file_pages(weight)  # read from now on only packed; read again from the file if ever needed
        return self.packed

    def __getstate__(self):  # a packed tensor cannot be copied or pickled; the copy repacks
        return {**self.__dict__, "packed": None, "key": None}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: PackedWeight) -> torch.Tensor:
    """x @ weight^T + bias, through `packed` in eval mode when nothing needs gradients on a fp32 CPU tensor
    outside autocast (under autocast F.linear computes in the autocast dtype, the packed path would not)."""
    params = (weight,) if bias is None else (weight, bias)
    recording = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    cpu32 = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    if ONEDNN and not packed.training and not recording and cpu32:
        return torch.ops.mkldnn._linear_pointwise(x, packed.of(weight), bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose forward is `linear` above."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.packed = PackedWeight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed)
