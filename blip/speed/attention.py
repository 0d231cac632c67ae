"""Scaled dot-product attention, softmax(q kᵀ / √hd) v, with its own backward for bf16 training on
the CPU.

The model attends through PyTorch's fused attention (`F.scaled_dot_product_attention`): on the CPU
its "flash" kernel never holds a (T x S) matrix of attention probabilities. Its backward in bf16,
though, runs well below the machine's matrix rate. So when training in bf16 on the CPU, `attention`
keeps the fused kernel's forward and the log-sum-exp of each row of scores it returns, and computes
the gradients itself (FlashAttention-2's backward, in batched matrix products, which run on the
CPU's bf16 units), a few heads at a time so that the probabilities it makes again stay small:

    P  = exp((q s) kᵀ − lse)            the probabilities again (s = 1/√hd)
    dv = Pᵀ do
    dP = do vᵀ
    dS = P ∘ (dP − rowsum(do ∘ o))      softmax's backward
    dq = dS k s,   dk = dSᵀ q s

Measured on an Intel Xeon with AMX, 2 threads: the base ViT's attention at batch 4 (577 tokens, 12
heads), forward and backward, 87 ms against the fused kernel's 98 ms; a whole base training step
in bf16 3.56 s against 3.98 s (median of 6, alternated). In fp32 the two backwards take the same
time, so fp32 keeps the fused one.

The scores are made again in fp32, as the forward made them: rounded to bf16 before exp, peaked
attention's probabilities would be off by several percent. The products then round P and dS to
bf16, as autograd's own bf16 attention does. Against fp64, for uniform to peaked attention (scores
of std 1 to 16), the gradients are 1.4-5x closer than that attention's and within 1.0-1.6x the
error of the fused backward, which never rounds P (tests/test_attention.py). Everything else (fp32,
GPUs, masks, dropout, inference, inputs the fused kernel does not take) is
`F.scaled_dot_product_attention` as is.
"""

import torch
import torch.nn.functional as F

CHUNK = 2**21  # elements of P made at once in backward: a few heads (8 MB in fp32)


def attention(q, k, v, mask=None, is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """q: (B, heads, T, hd); k, v: (B, heads, S, hd) -> (B, heads, T, hd)."""
    plain = mask is None and not is_causal and dropout_p == 0.0
    if plain and _bf16_cpu_training(q, k, v) and _flash_fits(q, k, v):
        return _FusedForwardMatmulBackward.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)


def _bf16_cpu_training(*tensors: torch.Tensor) -> bool:
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors))


def _flash_fits(q, k, v) -> bool:
    """What SDPA checks before it calls the CPU flash kernel: rows of unit stride, no empty sequence,
    one head size (elsewhere it takes its plain path, and so do we)."""
    return (all(t.stride(-1) == 1 for t in (q, k, v)) and q.shape[2] > 0 and k.shape[2] > 0
            and q.shape[-1] == k.shape[-1] == v.shape[-1])


class _FusedForwardMatmulBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        # o: (B, heads, T, hd); lse: (B, heads, T) fp32, the log-sum-exp of each row of scores
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, T, hd = q.shape
        S = k.shape[2]
        s = hd**-0.5
        rows = (do.float() * o.float()).sum(-1, keepdim=True)  # (B, heads, T, 1): rowsum(do ∘ o)
        lse = lse.unsqueeze(-1)  # (B, heads, T, 1)
        # the scores again in fp32, as the forward made them: rounded to bf16 before exp, the probabilities
        # of peaked attention would be off by a few percent
        q32, k32 = (q.float() * s).contiguous(), k.float().contiguous()
        q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()  # bmm reads rows
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        step = max(1, min(H, CHUNK // (T * S)))
        for b in range(B):
            for h in range(0, H, step):
                i = (b, slice(h, h + step))
                p = torch.bmm(q32[i], k32[i].transpose(1, 2)).sub_(lse[i]).exp_()  # (heads, T, S) fp32
                torch.bmm(p.to(q.dtype).transpose(1, 2), do[i], out=dv[i])
                ds = (do[i] @ v[i].transpose(1, 2)).float().sub_(rows[i]).mul_(p).to(q.dtype)  # (heads, T, S)
                torch.bmm(ds, k[i], out=dq[i])
                torch.bmm(ds.transpose(1, 2), q[i], out=dk[i])
        return dq.mul_(s), dk.mul_(s), dv
