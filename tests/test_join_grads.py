"""The gradient join (`embedtune.kernels.join_grads`): torch's ops where the Triton kernel does not run
(here, on the CPU), the kernel itself in tests/join_grads_cases.py under Triton's interpreter in a
process of its own (Triton chooses the interpreter at its first import), and the kernel compiled for
a Hopper GPU."""

from __future__ import annotations

import pytest
import torch

from embedtune.kernels import join_grads
from interpreter_cases import run_cases


def test_on_the_cpu_torch_joins_the_parts_and_sums_in_fp32():
    torch.manual_seed(0)
    grads = [(torch.randn(70, 24) + i).to(torch.bfloat16) for i in range(3)]
    assert not join_grads.can_join(grads)
    joined, sums = join_grads.join_and_sum(grads)
    want = torch.cat([g.double() for g in grads], dim=1)
    assert joined.dtype == torch.bfloat16 and torch.equal(joined.double(), want)
    assert sums.dtype == torch.float32 and torch.allclose(sums.double(), want.sum(0), rtol=1e-6, atol=1e-6)


def test_join_grads_cases_pass_under_the_triton_interpreter():
    pytest.importorskip("triton")
    run_cases("join_grads_cases.py")


def test_the_kernel_compiles_for_a_hopper_gpu_without_one():
    """The interpreter runs the kernel as Python, which lets through what the compiler refuses: compile it
    to a cubin for an H100/H200 (sm_90) here on the CPU, as a full fine-tuning step calls it (bf16 parts)."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from embedtune.kernels import triton_join

    kernel = triton_join._join_and_sum
    pointers = {"A": "*bf16", "B": "*bf16", "C": "*bf16", "OUT": "*bf16", "PARTIAL": "*fp32"}
    constexprs = {"RB": triton_join.ROWS, "CB": triton_join.COLUMNS}
    signature = {name: pointers.get(name, "constexpr" if name in constexprs else "i32") for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]
