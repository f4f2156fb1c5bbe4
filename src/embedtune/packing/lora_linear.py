"""Linear layers with LoRA applied directly, for the packed forward.

peft's LoRA Linear casts its input to the adapter dtype (fp32) and back on every call and runs
several Python checks; on GPU that is a large share of a step (copies and launch overhead). For
the common case (one active vanilla LoRA adapter on an nn.Linear) we compute
`x W^T + b + scaling * (x A^T) B^T` in the input's dtype, and defer to the module itself for
anything else. `linears` runs plain projections of one input (q, k, v; gate, up) as one product
over their concatenated weights where autocast casts them anyway. With `FUSE_LORA_ADD`, on the
packed stream (2-D inputs) the second low-rank product is accumulated into the base output by one
in-place `addmm_`, so the [tokens, out] low-rank output is never written out and read back. It is
off: an out-of-place `addmm` form measured slower than the separate add on an H200
(docs/BENCHMARKS.md); the in-place form is tested but not yet measured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import main_grad

FUSE_LORA_ADD = False  # off: measured slower on an H200 (docs/BENCHMARKS.md); the benchmark can turn it on
FUSE_PROJECTIONS = True  # `linears`: projections of one input as one matrix product (the benchmark can turn it off)


def _vanilla_adapter(module) -> str | None:
    """The single active plain-LoRA adapter (no `lora_bias`) of a peft Linear, or None if it is anything else."""
    base = getattr(module, "base_layer", None)
    if base is None or type(base) is not torch.nn.Linear:
        return None
    if module.disable_adapters or module.merged or getattr(module, "fan_in_fan_out", False):
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        return None
    if module.lora_B[active[0]].bias is not None:  # peft's lora_bias=True: the module adds it
        return None
    return active[0]


def linear_bias(module) -> torch.Tensor | None:
    """The bias `linear(module, x, bias=False)` leaves out, for a kernel downstream to add (and sum its
    gradient in the same pass); None where the module must run whole (hooks, other adapters) or has none."""
    if type(module) is torch.nn.Linear:
        return None if module._forward_hooks or module._forward_pre_hooks else module.bias
    return module.base_layer.bias if _vanilla_adapter(module) is not None else None


def linear(module, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """`module(x)` for an nn.Linear or a peft LoRA Linear, without peft's per-call dtype round-trips.
    `bias=False` (only where `linear_bias(module)` is not None): the same without the bias added."""
    shadows = main_grad.shadows_for([module], x)
    if shadows is not None:  # inside a step that owns its gradients
        return main_grad.linear(shadows, [module], x, bias)
    adapter = _vanilla_adapter(module)
    if not bias and type(module) is torch.nn.Linear:
        return F.linear(x, module.weight)
    if adapter is None:
        return module(x)
    base = module.base_layer
    out = F.linear(x, base.weight, base.bias if bias else None)
    dropout = module.lora_dropout[adapter]
    h = x if isinstance(dropout, torch.nn.Identity) else dropout(x)
    a = module.lora_A[adapter].weight
    b = module.lora_B[adapter].weight
    down = F.linear(h, a.to(h.dtype))  # [tokens, r]
    if FUSE_LORA_ADD and out.dim() == 2:
        # in place: F.linear's backward does not need its output, so autograd allows it
        return out.addmm_(down.to(out.dtype), b.to(out.dtype).t(), alpha=module.scaling[adapter])
    low_rank = F.linear(down, b.to(h.dtype))
    return torch.add(out, low_rank.to(out.dtype), alpha=module.scaling[adapter])


def _stackable(modules, x: torch.Tensor) -> bool:
    """Plain linears alike in dtype, device and input size, whose weights autocast casts anyway: then
    the stacked weight costs no memory beyond the casts autograd keeps for the backward (and a
    compiled graph makes the stacking and the cast one kernel). Weights already in the compute
    dtype would be copied, and the copy kept until the backward: per layer, and under FSDP for
    unsharded weights that FSDP would have freed. Modules with forward hooks run as themselves."""
    weights = [m.weight for m in modules]
    device = x.device.type
    return (main_grad.plain_linears(modules) and len({(w.dtype, w.device) for w in weights}) == 1
            and torch.is_autocast_enabled(device) and weights[0].dtype != torch.get_autocast_dtype(device))


def _stacked(modules, x: torch.Tensor) -> torch.Tensor:
    bias = torch.cat([m.bias for m in modules]) if modules[0].bias is not None else None
    return F.linear(x, torch.cat([m.weight for m in modules]), bias)


def linears(modules, x: torch.Tensor, fused: bool = False) -> list[torch.Tensor]:
    """`[linear(m, x) for m in modules]` for projections of one input (q, k, v; gate, up). Plain
    linears whose weights autocast casts (fp32 master weights, the usual full fine-tuning) run as
    one matrix product over their concatenated weights: fewer, larger GEMMs and fewer launches
    (+6% tokens/s eager, +8% compiled, BERT-base full fine-tuning on an H200). Everything else runs
    one by one: LoRA layers (stacking their frozen weights copies them every step: 12% slower), and
    weights already in the compute dtype (see `_stackable`). docs/BENCHMARKS.md has the runs. Inside
    `main_grad.active`, the plain linears run from one stacked shadow weight (`main_grad.linear`),
    which joins their gradients itself (`fused`: with the Triton kernel, `kernels.join_grads`)."""
    if FUSE_PROJECTIONS and len(modules) > 1:
        shadows = main_grad.shadows_for(modules, x)
        if shadows is not None:
            return list(main_grad.linear(shadows, modules, x, split=True, fused=fused))
        if _stackable(modules, x):
            sizes = [m.out_features for m in modules]
            return list(_stacked(modules, x).split(sizes, dim=-1))
    return [linear(m, x) for m in modules]
