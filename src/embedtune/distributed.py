"""Runs under `torchrun` / `accelerate launch`: who writes, and the process group's bookkeeping.

The launcher sets RANK / WORLD_SIZE; the HF Trainer (through accelerate) wraps the model in DDP.
embedtune adds what a contrastive run needs on top: the process group exists before the first
evaluation (so evaluation can be split across ranks), only rank 0 writes files and prints, and
the loss gathers embeddings across ranks (see `losses.gather_with_grad`).
"""

from __future__ import annotations

import os

import torch


def launched() -> bool:
    """True when a launcher started several processes for this run."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_if_launched() -> None:
    """Join the launcher's process group now, the way the HF Trainer will (accelerate's PartialState)."""
    if launched() and not initialized():
        from accelerate import PartialState

        PartialState()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 writes outputs and logs; the others only compute."""
    return rank() == 0


def barrier() -> None:
    if initialized():
        import torch.distributed as dist

        dist.barrier()


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rows split round-robin over ranks (`items[rank::world]`) back in their original order.

    Each rank holds `ceil((total - rank) / world)` rows; shorter ranks are padded for the gather.
    """
    world = world_size()
    if world == 1:
        return local
    import torch.distributed as dist

    per_rank = -(-total // world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    out = local.new_empty((total, *local.shape[1:]))
    for r, part in enumerate(parts):
        count = len(range(r, total, world))
        out[r::world] = part[:count]
    return out


def fsdp_arguments(backbone) -> dict:
    """HF Trainer arguments that shard the model with FSDP, one unit per transformer layer."""
    layers = list(getattr(backbone, "_no_split_modules", None) or [])
    if not layers:
        from .errors import EmbedtuneError

        raise EmbedtuneError(f"--fsdp: {type(backbone).__name__} names no layer class to shard by")
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": {"transformer_layer_cls_to_wrap": layers}}


def consolidate_backbone(trainer, st_model, backbone):
    """The trained backbone as one plain model on rank 0 (None elsewhere), from FSDP's shards.

    Gathering the full state dict is collective: every rank must call this. Rank 0 rebuilds the
    architecture on the meta device and assigns the gathered tensors, so nothing is initialized twice.
    """
    from transformers import AutoModel

    full = trainer.accelerator.get_state_dict(trainer.model)
    if not is_main():
        return None
    prefix = next(name for name, module in st_model.named_modules() if module is backbone) + "."
    weights = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    with torch.device("meta"):
        fresh = AutoModel.from_config(backbone.config)
    missing, unexpected = fresh.load_state_dict(weights, strict=False, assign=True)
    if unexpected or any(not k.endswith("position_ids") for k in missing):
        raise RuntimeError(f"FSDP consolidation: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, buffer in backbone.named_buffers():  # non-persistent buffers (rotary tables, position ids)
        owner, _, attr = name.rpartition(".")
        target = fresh.get_submodule(owner) if owner else fresh
        if getattr(target, attr).is_meta:
            target.register_buffer(attr, buffer.detach().cpu().clone(), persistent=False)
    return fresh.eval()
