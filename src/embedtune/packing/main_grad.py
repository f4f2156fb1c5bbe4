"""Linear layers that keep fp32 master weights (full fine-tuning under autocast) without the per-weight
casts of mixed precision.

Why: under bf16 autocast every Linear casts its fp32 weight (and bias) to bf16 in the forward, and in
the backward its weight gradient leaves the GEMM in bf16, is cast to fp32 and added into `.grad`:
several small elementwise kernels per weight, 175 of a BERT-base step's 1,192 device ops on an H200
(0.9 ms of 37.4; net of the fp32-output GEMMs' own cost, 0.8% a step: docs/BENCHMARKS.md). Here,
inside `active(shadows)`:

- the bf16 copies of the weights and biases live in persistent buffers (`Shadows`), refreshed once
  per step by one multi-tensor copy (`Shadows.refresh`); stacked projections (q, k, v) share one
  buffer, so their product needs no concatenation either;
- the backward writes each weight's gradient straight into its fp32 `.grad` with the GEMM itself
  (`addmm` with an fp32 output and beta 1): no cast, no add, and the gradient is summed in fp32
  without an intermediate bf16 rounding. A single layer's bias gradient is summed in the compute
  dtype, as autograd does, and added;
- stacked projections hand back their outputs split (views of the one product), so the backward
  gets q, k and v's gradients apart and joins them itself, summing the stacked bias's gradient in
  fp32 in the same pass (`kernels.join_grads`: one Triton kernel with the fused kernels on) where
  autograd would join them with a cat and sum them in a second pass.

The weights' own autograd accumulation (and any hook on it: DDP's, FSDP's) does not run for these
weights, so only a step that owns its gradients turns this on: `graphs.GraphedStep` (one process, no
sharding, gradients in static buffers). Everything else takes the plain path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import torch.nn.functional as F

from ..kernels.join_grads import join_and_sum

_ACTIVE = contextvars.ContextVar("embedtune_main_grad_shadows", default=None)


class Shadows:
    """The compute-dtype copies of the weights `linear` ran on, one buffer per call site's group of
    modules, made at first use and refreshed in one copy per step."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._buffers: dict[tuple[int, ...], torch.Tensor] = {}
        self._targets: list[torch.Tensor] = []  # views into the buffers, one per weight
        self._sources: list[torch.Tensor] = []  # the fp32 weights they copy

    def stacked(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The parameters (weights, or biases) stacked along dim 0 in the compute dtype: one buffer per
        group, made and filled at first use, refreshed by `refresh`."""
        key = tuple(id(p) for p in params)
        buffer = self._buffers.get(key)
        if buffer is None:
            if params[0].is_cuda:
                _gemm_mode(params[0].device.index or 0, self.dtype)  # checked at first use: never inside a capture
            buffer = torch.empty(sum(p.shape[0] for p in params), *params[0].shape[1:], dtype=self.dtype,
                                 device=params[0].device)
            offset = 0
            for p in params:
                view = buffer[offset : offset + p.shape[0]]
                with torch.no_grad():
                    view.copy_(p)
                self._targets.append(view)
                self._sources.append(p)
                offset += p.shape[0]
            self._buffers[key] = buffer
        return buffer

    def refresh(self) -> None:
        """Copy every weight into its buffer (after an optimizer step changed them): one multi-tensor copy."""
        if self._targets:
            with torch.no_grad():
                torch._foreach_copy_(self._targets, [w.detach() for w in self._sources])


def plain_linears(modules) -> bool:
    """Plain nn.Linear layers (no hooks, so nothing expects to see them called) of one input size, with
    biases on all or none: what may run as one product over their stacked weights."""
    return (all(type(m) is torch.nn.Linear and not (m._forward_hooks or m._forward_pre_hooks) for m in modules)
            and len({m.weight.shape[1] for m in modules}) == 1
            and len({m.bias is not None for m in modules}) == 1)


def applies(modules, x: torch.Tensor) -> bool:
    """Whether `linear` takes these modules: `plain_linears` with trained fp32 weights (and biases),
    under half-precision autocast, in a forward whose backward will run (grad enabled, an input that
    requires grad)."""
    device = x.device.type
    if not (torch.is_grad_enabled() and x.requires_grad and torch.is_autocast_enabled(device)):
        return False  # no backward to run (eval, or an input without grad: the weights' gradients would be lost)
    if torch.get_autocast_dtype(device) not in (torch.bfloat16, torch.float16):
        return False
    return (plain_linears(modules)
            and all(m.weight.dtype == torch.float32 and m.weight.requires_grad for m in modules)
            and all(m.bias is None or m.bias.requires_grad for m in modules))


def shadows_for(modules, x: torch.Tensor) -> Shadows | None:
    """The running step's shadows where `linear` takes these modules (`applies`), else None."""
    shadows = current()
    return shadows if shadows is not None and applies(modules, x) else None


def current() -> Shadows | None:
    """The shadows of the step running now, or None outside `active` and in compiled code (whose
    layers autocast and autograd handle as one graph)."""
    if torch.compiler.is_compiling():
        return None
    return _ACTIVE.get()


@contextlib.contextmanager
def active(shadows: Shadows):
    """Inside this block `packing.lora_linear` runs the layers `applies` takes through `linear` here."""
    token = _ACTIVE.set(shadows)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@functools.cache
def _gemm_mode(index: int, dtype: torch.dtype) -> str:
    """How this torch's CUDA GEMM can sum half-precision products in fp32: "addmm" (into an fp32 `out`
    that is also its input: the gradient accumulates in the GEMM), "mm" (an fp32 product, then added)
    or "cast" (neither: the product in half precision, cast and added, as autograd would), for inputs
    of `dtype`."""
    device = torch.device("cuda", index)
    a = torch.ones(8, 8, device=device, dtype=dtype)
    try:
        c = torch.ones(8, 8, device=device)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        if bool((c == 9).all()):
            return "addmm"
    except (RuntimeError, TypeError):
        pass
    try:
        if bool((torch.mm(a, a, out_dtype=torch.float32) == 8).all()):
            return "mm"
    except (RuntimeError, TypeError):
        pass
    return "cast"


def _accumulate(param: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """param.grad += a @ b (half-precision a, b), summed in fp32 by the GEMM where it can."""
    mode = _gemm_mode(a.device.index or 0, a.dtype) if a.is_cuda else "cpu"
    if mode == "addmm" and param.grad is not None:
        torch.addmm(param.grad, a, b, out_dtype=torch.float32, out=param.grad)
        return
    if mode in ("addmm", "mm"):
        product = torch.mm(a, b, out_dtype=torch.float32)
    elif mode == "cpu":
        product = a.float() @ b.float()  # the CPU tests: the same fp32 sum
    else:
        product = (a @ b).float()
    _add_grad(param, product)


def _add_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)


class _MainGradLinear(torch.autograd.Function):
    """y = x W^T + b with W the shadow buffer, or with `sizes` y split into views of those widths; the
    backward writes the weights' and biases' gradients into their `.grad` and returns none for them."""

    @staticmethod
    def forward(ctx, x, weight16, bias16, params, sizes, fused):
        ctx.params = params  # (weights, biases): long-lived parameters, not saved activations
        x16 = x.to(weight16.dtype)
        ctx.input_dtype, ctx.fused = x.dtype, fused
        ctx.save_for_backward(x16, weight16)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x16, weight16, bias16)
        return out if sizes is None else out.split(sizes, dim=-1)

    @staticmethod
    def backward(ctx, *grads):  # one per output; an unused output's come as zeros (materialized by autograd)
        x16, weight16 = ctx.saved_tensors
        weights, biases = ctx.params
        parts = [g.reshape(-1, g.shape[-1]).to(weight16.dtype) for g in grads]
        db = None
        if len(parts) == 1:
            dy = parts[0]
            if biases:
                db = dy.sum(0)  # in the compute dtype, as autograd sums a biased product's gradient
        elif biases:
            dy, db = join_and_sum(parts, ctx.fused)  # db in fp32
        else:
            dy = torch.cat(parts, dim=1)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight16).view(x16.shape).to(ctx.input_dtype)
        x2 = x16.reshape(-1, x16.shape[-1])
        offset = 0
        for w in weights:
            _accumulate(w, dy[:, offset : offset + w.shape[0]].t(), x2)
            offset += w.shape[0]
        if db is not None:
            for b, part in zip(biases, db.split([w.shape[0] for w in weights])):
                _add_grad(b, part)
        return dx, None, None, None, None, None


def linear(shadows: Shadows, modules, x: torch.Tensor, bias: bool = True, split: bool = False,
           fused: bool = False):
    """The modules' outputs concatenated (one module: its output), from the shadow weights, with
    gradients written into the fp32 parameters' `.grad` (see the module docstring). `bias=False`: the
    product without the biases (a fused norm downstream adds them). `split`: a tuple of the modules'
    outputs instead, whose gradients the backward joins itself; `fused`: with the Triton kernel where
    it applies (`kernels.join_grads`)."""
    weight16 = shadows.stacked([m.weight for m in modules])
    biases = [m.bias for m in modules] if bias and modules[0].bias is not None else []
    bias16 = shadows.stacked(biases) if biases else None
    sizes = [m.out_features for m in modules] if split else None
    # The parameters go in only through ctx: autograd must see an input that requires grad for the
    # backward to run, which `x` does in training (activations of trained layers).
    return _MainGradLinear.apply(x, weight16, bias16, ([m.weight for m in modules], biases), sizes, fused)
