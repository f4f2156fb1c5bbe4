"""FSDP (torch's `fully_shard`, FSDP2) for full fine-tuning of models that do not fit with DDP.

DDP keeps a whole copy of the weights, gradients and AdamW state on every GPU: 16 bytes a parameter
in fp32, 64 GB for a 4B decoder before any activation. `shard_model` splits all three over the ranks
instead. Each transformer layer is sharded on its own (gathered just before it runs, freed after),
then the backbone as a whole (embeddings, final norm). The sentence-transformers modules around the
backbone (pooling, normalize) hold no weights and stay as they are.

Five things make this work inside the HF Trainer, which knows nothing of it:
* the packed forward runs the layers' weights without calling the layers, so each layer gets a
  `PACKED_STEP` method that FSDP treats as a forward (`register_fsdp_forward_method`); likewise
  the backbone's `forward`, which sentence-transformers 6 calls directly, not through `__call__`;
* the trainer must not wrap the model in DDP as well: accelerate leaves a model alone once it is
  marked prepared;
* nothing may move the sharded model (`.to()` becomes a no-op on it);
* every rank runs every evaluation (each forward is a collective; see `is_sharded` in
  `retrieval.shard_across_ranks` and `resilience.ResumableTrainer.evaluation_loop`);
* saving needs the full weights: `full_state_dict` gathers them (every rank takes part) and rank 0
  loads them into an unsharded copy of the model.
"""

from __future__ import annotations

import torch

from .model_facts import unwrap_peft
from .packing.layers import PACKED_STEP


def _packed_step(layer, step, hidden):
    return step(layer, hidden)


def backbone_of(st_model):
    """The transformers model inside a SentenceTransformer's first module (peft unwrapped)."""
    return unwrap_peft(st_model[0].auto_model)


def transformer_layers(model) -> torch.nn.ModuleList:
    """The model's stack of repeated blocks: the longest ModuleList of one layer class."""
    best = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError(f"{type(model).__name__}: no stack of transformer layers to shard")
    return best


def is_sharded(st_model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(backbone_of(st_model), FSDPModule)


def shard_model(st_model, param_dtype: torch.dtype | None = None) -> None:
    """Shard the backbone of `st_model` over all ranks of the default process group, in place.

    `param_dtype` (bf16 on GPU) is the dtype weights are gathered and computed in; the sharded
    master weights, gradients reductions and optimizer state stay fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    backbone = backbone_of(st_model)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": policy} if policy else {}
    for layer in transformer_layers(backbone):
        fully_shard(layer, **kwargs)
        layer.__dict__[PACKED_STEP] = _packed_step.__get__(layer)
        register_fsdp_forward_method(layer, PACKED_STEP)
    fully_shard(backbone, **kwargs)
    register_fsdp_forward_method(backbone, "forward")  # sentence-transformers 6 calls `.forward` directly
    st_model._is_accelerate_prepared = True  # accelerate: do not also wrap this model in DDP
    # `encode` and the trainer call `.to(device)`; on sharded (DTensor) weights that copies and then
    # fails to swap them in. FSDP has placed every shard already: the model stays where it is.
    st_model.__dict__["to"] = lambda *args, **kwargs: st_model


def full_state_dict(st_model) -> dict[str, torch.Tensor]:
    """The backbone's unsharded weights on the CPU, on rank 0 (empty elsewhere). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(backbone_of(st_model), options=options)


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter (DTensor), or the tensor itself."""
    to_local = getattr(param, "to_local", None)
    return to_local() if to_local is not None else param
