"""The fused dropout + residual + LayerNorm kernels (`embedtune.kernels.fused_norm`) against the plain
ops on the CPU: the cases in tests/fused_norm_cases.py, run under Triton's interpreter in a process
of their own (Triton chooses the interpreter at its first import)."""

from __future__ import annotations

import pytest

from interpreter_cases import run_cases

pytest.importorskip("triton")


def test_fused_norm_cases_pass_under_the_triton_interpreter():
    run_cases("fused_norm_cases.py")


def _ptr(kind: str) -> str:
    return "*" + kind


def test_kernels_compile_for_a_hopper_gpu_without_one():
    """Triton's interpreter (the cases above) runs the kernels as Python, which lets through what the
    compiler refuses (a plain global read inside a kernel, an unsupported op). Compile each kernel to a
    cubin for an H100/H200 (sm_90) here on the CPU, as a training step's variant: bf16 autocast, an fp32
    stream and fp32 weights, BERT-base's block width."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from embedtune.kernels import triton_norm

    forward = {"X": "bf16", "XB": "fp32", "R": "fp32", "W": "fp32", "B": "fp32", "Y": "fp32", "Y_HALF": "bf16",
               "S": "fp32", "MEAN": "fp32", "RSTD": "fp32", "SEED": "i64"}
    backward = {"DY": "fp32", "DY_HALF": "bf16", "S": "fp32", "MEAN": "fp32", "RSTD": "fp32", "W": "fp32",
                "SEED": "i64", "DS": "fp32", "DX": "bf16", "PARTIAL": "fp32"}
    scalars = {"p": "fp32", "eps": "fp32"}
    block, rows, _ = triton_norm._block(768)
    for kernel, pointers in ((triton_norm._forward, forward), (triton_norm._backward, backward)):
        signature = {}
        for name in kernel.arg_names:
            if name in pointers:
                signature[name] = _ptr(pointers[name])
            elif name in ("BLOCK", "ROWS"):
                signature[name] = "constexpr"
            else:
                signature[name] = scalars.get(name, "i32")
        source = ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK": block, "ROWS": rows})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel
