"""Runs under `torchrun` / `accelerate launch`: who writes, and the process group's bookkeeping.

The launcher sets RANK / WORLD_SIZE; the HF Trainer (through accelerate) wraps the model in DDP.
embedtune adds what a contrastive run needs on top: the process group exists before the first
evaluation (so evaluation can be split across ranks), only rank 0 writes files and prints, and
the loss gathers embeddings across ranks (see `losses.gather_with_grad`). torch is imported by the
functions that use it: the CLI asks who prints before torch loads (its errors, its notices).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


def launched_rank() -> int | None:
    """This process's rank when a launcher started several (from its environment, so without torch);
    None in a single process."""
    return int(os.environ.get("RANK", "0")) if launched() else None


def quiet_other_ranks() -> None:
    """On every rank but 0, the libraries' own progress bars are off (datasets' map bars, such as the
    no-duplicates sampler's hashing; transformers' loading bars): a run shows one set of bars, rank
    0's, as the trainer does with its own."""
    if not launched() or is_main():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import datasets
    except ImportError:
        return
    datasets.disable_progress_bars()


def tell_launcher(line: str) -> bool:
    """Leave `line` as this process's failure in the launcher's error file (torchrun names each failed
    rank with its reason in its summary instead of "To enable traceback see ..."); False when no
    launcher asked for one (`TORCHELASTIC_ERROR_FILE` unset) or it can't be written."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE") if launched() else None
    if not path:
        return False
    try:
        with open(path, "w") as f:
            # the layout of torch's own `ErrorHandler.record_exception`; the summary shows "py_callstack"
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                   "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        return False
    return True


def end_process_group() -> None:
    """Leave the process group now, before the interpreter's teardown: torch's communication threads
    left for the teardown to destroy sometimes abort the process ("terminate called without an active
    exception"), and torchrun then reports a run that finished and saved as failed. For a finished
    run only (every rank here, nothing in flight)."""
    if "torch.distributed" not in sys.modules:  # no group was ever made in this process
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if initialized():
        import torch.distributed as dist

        dist.barrier()


def rank0_says(flag: bool) -> bool:
    """Rank 0's value of `flag` on every rank: decisions made from one clock (when to checkpoint)."""
    if not initialized() or world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rows split round-robin over ranks (`items[rank::world]`) back in their original order.

    Each rank holds `ceil((total - rank) / world)` rows; shorter ranks are padded for the gather.
    """
    world = world_size()
    if world == 1:
        return local
    import torch
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


def check_in_sync(model) -> None:
    """Under DDP every rank must end with the same weights; a launch that trained the ranks apart
    (no gradient averaging) fails here rather than saving one rank's model as if it were the run's."""
    if not initialized() or world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        total = sum((p.detach().double().sum() for p in model.parameters() if p.requires_grad),
                    torch.zeros((), dtype=torch.float64))
    device = next(model.parameters()).device
    sums = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(world_size())]
    dist.all_gather(sums, total.to(device))
    values = [float(v) for v in sums]
    if max(values) - min(values) > 1e-6 * max(1.0, abs(values[0])):
        raise RuntimeError(f"ranks ended training with different weights (checksums {values}): "
                           "gradients were not averaged across processes")
