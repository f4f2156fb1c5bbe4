"""The calls that build every fused kernel variant a packed BERT training step uses (`fused_norm`,
`join_grads`): the ops called forward and backward with the dtypes of a step under bf16 autocast (fp32
stream, weights in the run's dtype), dropout on. `prebuild`'s child process runs them on the run's
card so that Triton's cache holds those kernels before the run's first step; tests check that they
call every variant a step calls.
"""

from __future__ import annotations

import torch

from .fused_norm import residual_norm
from .join_grads import join_and_sum

_ROWS = 256


def _attention_norm(width: int, weights_dtype: torch.dtype, device: torch.device) -> None:
    """The attention sub-block's norm: the fp32 stream plus its bf16 copy, both read downstream (the copy
    by the next products, so its gradient comes back in bf16), with its dense layer's bias."""
    norm, stream, branch, bias = _norm_inputs(width, weights_dtype, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        hidden, product_input = residual_norm(norm, torch.nn.Dropout(0.1), branch, stream, fused=True, branch_bias=bias)
        product = product_input * torch.ones_like(product_input)
    (hidden.square().mean() + product.float().square().mean()).backward()


def _ffn_norm(width: int, weights_dtype: torch.dtype, device: torch.device) -> None:
    """The feed-forward sub-block's norm: the stream only, with its dense layer's bias."""
    norm, stream, branch, bias = _norm_inputs(width, weights_dtype, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, _ = residual_norm(norm, torch.nn.Dropout(0.1), branch, stream, fused=True, product_input=False,
                               branch_bias=bias)
    out.float().square().mean().backward()


def _qkv_join(width: int, weights_dtype: torch.dtype, device: torch.device) -> None:
    """Full fine-tuning's join of q, k and v's bf16 gradients (`packing.main_grad`)."""
    join_and_sum([torch.randn(_ROWS, width, device=device, dtype=torch.bfloat16) for _ in range(3)])


def _norm_inputs(width: int, weights_dtype: torch.dtype, device: torch.device):
    """A LayerNorm in the run's weight dtype, the fp32 stream (autocast's LayerNorm output), a bf16
    branch, and the dense layer's bias: trained with fp32 weights (full), frozen in bf16 (LoRA)."""
    norm = torch.nn.LayerNorm(width, eps=1e-12, device=device, dtype=weights_dtype)
    stream = torch.randn(_ROWS, width, device=device, requires_grad=True)
    branch = torch.randn(_ROWS, width, device=device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(width, device=device, dtype=weights_dtype, requires_grad=weights_dtype == torch.float32)
    return norm, stream, branch, bias


def build(width: int, weights_dtype: torch.dtype, device: torch.device, threads: int | None = None) -> None:
    """Call the fused ops forward and backward as a packed BERT layer does under bf16 autocast, dropout
    on: each sub-block's norm, and for full fine-tuning (fp32 weights; LoRA's frozen q, k, v weights take
    no gradient to join) the q, k, v gradients' join.

    Each variant's first call builds it: Triton's compiler, ptxas and a C launcher that the system
    compiler builds, the last two in subprocesses, outside the GIL. The calls share no variant, so on a
    CUDA device they run in threads of their own (`threads`: how many; 1 calls them in turn, as under
    Triton's interpreter): full fine-tuning's three took 5.4 s in the child against 6.6-7.4 s in turn
    on an H200 (benchmarks/check_prebuild_gpu.py)."""
    torch.manual_seed(0)
    calls = [_attention_norm, _ffn_norm] + ([_qkv_join] if weights_dtype == torch.float32 else [])
    threads = threads if threads is not None else (len(calls) if device.type == "cuda" else 1)
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads, thread_name_prefix="embedtune-build") as pool:
            for done in [pool.submit(call, width, weights_dtype, device) for call in calls]:
                done.result()
    else:
        for call in calls:
            call(width, weights_dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
