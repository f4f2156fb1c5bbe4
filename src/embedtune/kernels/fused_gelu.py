"""`gelu(x W^T + b)`, a BERT-family intermediate layer, with the bias add and its gradient in the GELU's
own passes (Triton kernels, `triton_gelu`).

Run as modules, the linear layer adds its bias in the matrix product and the GELU is one kernel each
way; the bias gradient is then a column reduction of its own over the [tokens, intermediate]
gradient (43 us a layer at BERT-base's 3,072 columns on an H200, `probe_bias_grad_h200_2026-12-03.log`).
Here the product is made without the bias, the forward kernel adds it before the GELU, and the
backward kernel sums the gradient's columns while it writes that gradient. Numerics: the exact (erf)
GELU in fp32 on the product plus the bias, as the plain path computes it on the product rounded
with its bias; the bias gradient is summed in fp32.
`bias_gelu` applies where the fused norm does (`fused_norm.will_fuse`'s conditions: CUDA or Triton's
interpreter, autograd on, not compiling) and the activation is the exact GELU.
"""

from __future__ import annotations

import torch

from .fused_norm import can_build, interpreting


def _kernels():
    from . import triton_gelu  # imported on first use: Triton's import and JIT are not free

    return triton_gelu


class BiasGelu(torch.autograd.Function):
    """h = gelu(x + bias), exact GELU; x [..., features], bias [features]."""

    @staticmethod
    def forward(ctx, x, bias):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        h = _kernels().forward(x2, bias)
        ctx.save_for_backward(x2, bias)
        return h.view(shape)

    @staticmethod
    def backward(ctx, dh):
        x2, bias = ctx.saved_tensors
        want_dx, want_db = ctx.needs_input_grad
        dx, db = _kernels().backward(dh.reshape(x2.shape).contiguous(), x2, bias, want_db)
        return (dx.view(dh.shape) if want_dx else None), (db.to(bias.dtype) if want_db else None)


def exact_gelu(act) -> bool:
    """Whether a model's activation module is the exact (erf) GELU: torch's, or transformers' "gelu"
    (`GELUActivation`, which calls torch's)."""
    if type(act) is torch.nn.GELU:
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is torch.nn.functional.gelu


def will_fuse_gelu(act, like: torch.Tensor, fused: bool) -> bool:
    """Whether `bias_gelu` may stand in for `act(linear + bias)` on `like`'s device."""
    return (fused and can_build() and torch.is_grad_enabled() and (like.is_cuda or interpreting())
            and exact_gelu(act) and not torch.compiler.is_compiling())


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) by the fused kernels; x is a linear layer's output made without its bias."""
    return BiasGelu.apply(x, bias)
