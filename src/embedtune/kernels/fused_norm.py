"""`LayerNorm(dropout(branch) + residual)`, the end of every BERT-family sub-block, as one kernel each way.

Run op by op (dropout, add, LayerNorm, and under autocast the cast of the result for the next
matrix products), the stream is read and written five times forward and as often backward, and the
dropout mask is stored. On a CUDA device (Triton kernels, `triton_norm`) the forward reads branch
and residual once and writes the normalized stream, its copy in the autocast dtype and the pre-norm
sum; the backward reads them once. Dropout draws its mask from a seed that is itself drawn from
torch's CUDA generator on every call, so: each step (and each CUDA-graph replay, whose generator
offsets advance) gets a new mask, activation checkpointing's recompute (which restores the RNG
state) gets the same one, and eval mode draws nothing. The masks are not torch's own bits; their
rate, scale and reuse in the backward are (tests/test_fused_norm.py).

Numerics are those of the plain path under autocast (LayerNorm in fp32, result in fp32), with the
dropped branch kept in fp32 instead of rounded to the branch's dtype before the add.
`residual_norm` picks the fused op where it applies and the modules otherwise: under
torch.compile (inductor fuses the plain ops itself), on the CPU, for a LayerNorm without affine
weights, or where Triton is not installed.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch

MAX_COLUMNS = 8192  # one row per tile in registers; wider rows take the plain ops
_TRITON = importlib.util.find_spec("triton") is not None


def _kernels():
    from . import triton_norm  # imported on first use: Triton's import and JIT are not free

    return triton_norm


@lru_cache(maxsize=None)
def kernels_fingerprint() -> str:
    """Names this build of the kernels (their source, the card) for `speed`'s cache marker: the fused
    norm's and the gradient join's (`join_grads`), which the same runs build."""
    from ..speed import fused_kernels_fingerprint

    sources = [(Path(__file__).parent / name).read_text() for name in ("triton_norm.py", "triton_join.py")]
    return fused_kernels_fingerprint("".join(sources))


@lru_cache(maxsize=None)
def _mark_built(device_index: int) -> None:
    """After the first call on a CUDA device: later runs find the kernels in Triton's cache."""
    from ..speed import mark_fused_kernels_built

    mark_fused_kernels_built(kernels_fingerprint())


class DropoutAddNorm(torch.autograd.Function):
    """y = LayerNorm(dropout(x + branch_bias, p) + residual); with `half_dtype`, also y in that dtype
    (second output). `branch_bias` (optional): the bias of the linear layer that made x, left to this op
    so its gradient is summed here, not by a reduction of its own."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, p: float, eps: float, seed, out_dtype, half_dtype, branch_bias=None):
        shape = residual.shape
        x2, r2 = x.reshape(-1, shape[-1]).contiguous(), residual.reshape(-1, shape[-1]).contiguous()
        y, y_half, s, mean, rstd = _kernels().forward(x2, r2, weight, bias, seed, p, eps, out_dtype, half_dtype,
                                                      branch_bias=branch_bias)
        ctx.save_for_backward(s, mean, rstd, weight, seed)
        ctx.p, ctx.shape = p, shape
        ctx.dtypes = (x.dtype, residual.dtype, bias.dtype, branch_bias.dtype if branch_bias is not None else None)
        ctx.set_materialize_grads(False)
        if y_half is None:
            return y.view(shape)
        return y.view(shape), y_half.view(shape)

    @staticmethod
    def backward(ctx, dy, dy_half=None):
        s, mean, rstd, weight, seed = ctx.saved_tensors
        x_dtype, residual_dtype, bias_dtype, branch_bias_dtype = ctx.dtypes
        cols = ctx.shape[-1]
        if dy is None and dy_half is None:
            return (None,) * 10
        if dy is None:  # only the copy in the autocast dtype fed anything that needs a gradient
            dy, dy_half = dy_half, None
        dy = dy.reshape(-1, cols).contiguous()
        dy_half = dy_half.reshape(-1, cols).contiguous() if dy_half is not None else None
        want_dx, want_dr, want_dw, want_db = ctx.needs_input_grad[:4]
        want_dxb = len(ctx.needs_input_grad) > 9 and ctx.needs_input_grad[9]
        ds, dx, dw, db, dxb = _kernels().backward(dy, dy_half, s, mean, rstd, weight, seed, ctx.p, x_dtype,
                                                  residual_dtype, want_dx, want_dw or want_db, want_dxb=want_dxb)
        return (dx.view(ctx.shape) if want_dx else None, ds.view(ctx.shape) if want_dr else None,
                dw if want_dw else None, db.to(bias_dtype) if want_db else None, None, None, None, None, None,
                dxb.to(branch_bias_dtype) if want_dxb else None)


def dropout_seed(device: torch.device) -> torch.Tensor:
    """A fresh seed on the device, drawn from torch's generator (so CUDA-graph replays draw anew)."""
    return torch.randint(0, 2 ** 31 - 1, (1,), device=device, dtype=torch.int64)


def can_build() -> bool:
    """Triton is installed, so the kernels can be built for a CUDA device."""
    return _TRITON


def can_fuse(norm, branch: torch.Tensor) -> bool:
    """Whether `residual_norm` may take the fused op for this LayerNorm and input (`branch`, or any
    tensor on its device)."""
    return (_TRITON and (branch.is_cuda or interpreting()) and type(norm) is torch.nn.LayerNorm
            and norm.weight is not None and norm.bias is not None and len(norm.normalized_shape) == 1
            and norm.normalized_shape[0] <= MAX_COLUMNS and not torch.compiler.is_compiling())


def will_fuse(norm, like: torch.Tensor, fused: bool) -> bool:
    """Whether `residual_norm(norm, ..., fused)` takes the fused op for a branch on `like`'s device, so
    the caller may leave the branch's bias to it (`branch_bias`)."""
    return fused and torch.is_grad_enabled() and can_fuse(norm, like)


def interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def dropout_add_norm(norm: torch.nn.LayerNorm, p: float, branch: torch.Tensor, residual: torch.Tensor,
                     with_half: bool = True, branch_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op with the plain path's dtypes: (normalized stream, its input for the next matrix
    products). Under autocast the stream is fp32, as autocast's LayerNorm returns, and the second is
    the same values in the autocast dtype; without autocast both are one tensor."""
    device = branch.device.type
    autocast = torch.is_autocast_enabled(device)
    out_dtype = torch.float32 if autocast else torch.promote_types(branch.dtype, residual.dtype)
    half_dtype = torch.get_autocast_dtype(device) if autocast else None
    if not with_half or half_dtype == out_dtype:
        half_dtype = None
    seed = dropout_seed(branch.device) if p > 0 else None
    out = DropoutAddNorm.apply(branch, residual, norm.weight, norm.bias, p, norm.eps, seed, out_dtype, half_dtype,
                               branch_bias)
    if branch.is_cuda:
        _mark_built(branch.device.index or 0)
    return out if half_dtype is not None else (out, out)


def residual_norm(norm, dropout, branch: torch.Tensor, residual: torch.Tensor, fused: bool,
                  product_input: bool = True, branch_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`norm(dropout(branch + branch_bias) + residual)`, and the same values as the next products' input.

    `fused` (from `PackedOptions.fused_kernels`): use the fused op where `can_fuse` allows, in training
    (with autograd on; encoding without gradients runs the modules, unreplayed and bound by launches).
    `product_input`: the caller feeds the result to matrix products (so the fused op also writes
    the autocast copy); False: only the stream is used, and the second value is the stream.
    `branch_bias`: pass the branch's linear bias here only where `will_fuse` says the fused op runs
    (elsewhere the linear layer's own add is cheaper); the plain ops still add it."""
    if will_fuse(norm, branch, fused):  # inference: launch-bound, the modules
        p = dropout.p if dropout.training else 0.0
        return dropout_add_norm(norm, p, branch, residual, with_half=product_input, branch_bias=branch_bias)
    if branch_bias is not None:
        branch = branch + branch_bias.to(branch.dtype)
    out = norm(dropout(branch) + residual)
    return out, out
