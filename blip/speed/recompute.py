"""What training keeps for backward, per transformer block: `run(block, *inputs, mode=...)`.

Autograd keeps every tensor a backward formula needs. For a base ViT block at batch 4 (577 tokens,
width C = 768) that is 16 tensors of (B, N, C) size, 108 MB in fp32: the block's input, both layer-norm
outputs, q/k/v, the attention output, the residual sum, the MLP's hidden layer before and after the
GELU (4C wide each). Some are costly to make again (matrix products, attention), others cost almost
nothing (layer norms, the GELU, residual adds) yet take a third of the memory. So:

  none         plain autograd: keep everything.
  elementwise  keep the outputs of matrix products and attention, and the low-precision copies of the
               weights autocast makes; recompute the element-wise ops in backward from them. 11 of the 16
               tensors are kept (about 400 MB less for the base ViT at batch 4), the gradients are the
               same bit for bit (dropout included: the random stream is replayed), and the extra
               work is a few element-wise passes per block.
  full         keep only the block's input and run the whole block again in backward (gradient
               checkpointing): the least memory, about a third more compute.

Both are PyTorch's activation checkpointing (`torch.utils.checkpoint`); "elementwise" is its selective
form, whose policy below says which results to keep.
"""

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "elementwise", "full")

aten = torch.ops.aten
# results worth keeping: matrix products and every fused attention kernel SDPA may pick
ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten._scaled_dot_product_flash_attention.default,
             aten._scaled_dot_product_efficient_attention.default,
             aten._scaled_dot_product_cudnn_attention.default}
PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, *ATTENTION}


def _keep_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep products, attention and autocast's casts of weights (casting again would cost a pass over
    the weights); recompute the rest (norms, GELU, adds, casts of activations, views).

    Attention with dropout is recomputed too: its kernel draws random numbers, and the recomputation
    replays the random stream from the block's start, so every later dropout mask must be drawn again
    in the same order to come out the same."""
    if op in ATTENTION and _dropout_p(op, args, kwargs) > 0:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if op in PRODUCTS or (op == aten._to_copy.default and isinstance(args[0], nn.Parameter)):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _dropout_p(op, args, kwargs) -> float:
    i = [a.name for a in op._schema.arguments].index("dropout_p")
    return kwargs.get("dropout_p", args[i] if i < len(args) else 0.0)


MIN_PARAMS = 100_000_000  # "elementwise" pays from here: below, the per-op overhead of recomputing shows


def pick_mode(mode: str, model: nn.Module, device: torch.device) -> str:
    """`mode` as asked, or for "auto" train.py's default: "elementwise" on CPU for models of 100 M
    parameters or more, where it was measured (benchmarks/bench_train.py, base: 0.4 GB less peak
    memory, the same step time); "none" for smaller ones (the tiny preset's step takes 22% longer
    with it, for memory it does not need) and on CUDA (not measured there)."""
    if mode != "auto":
        return mode
    if any(hasattr(m, "lora_A") for m in model.modules()):
        # LoRA (blip/lora.py) adds to its layers' outputs in place, which a kept result must not see; and
        # with frozen weights plain autograd keeps less than "elementwise" would (base, batch 4: 3.6 GB
        # peak against 4.4 GB)
        return "none"
    big = sum(p.numel() for p in model.parameters()) >= MIN_PARAMS
    return "elementwise" if device.type == "cpu" and big else "none"


def run(block: nn.Module, *inputs, mode: str):
    """block(*inputs), keeping for backward what `mode` says (the module docstring); in eval mode or
    without gradients, simply block(*inputs)."""
    if mode == "none" or not block.training or not torch.is_grad_enabled():
        return block(*inputs)
    if mode == "full":
        return checkpoint(block, *inputs, use_reentrant=False)
    if mode == "elementwise":
        return checkpoint(block, *inputs, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _keep_products))
    raise ValueError(f"recompute mode must be one of {MODES}, not {mode!r}")
