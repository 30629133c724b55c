"""The package's import contract: ops registered, CUDA untouched."""

import subprocess
import sys

import torch

import pearlmoe

OPS = [
    "topk_softmax",
    "moe_align",
    "grouped_gemm",
    "grouped_gemm_wgrad",
    "moe_ffn_routed",
    "moe_ffn",
    "attention",
    "rope_qk_norm",
    "spec_verify",
]


def test_import_does_not_initialise_cuda():
    code = "import torch, pearlmoe; assert not torch.cuda.is_initialized(), 'CUDA initialised'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ops_registered_for_cpu_and_cuda():
    for name in OPS:
        qualname = f"pearlmoe::{name}"
        assert hasattr(torch.ops.pearlmoe, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
        # Always registered: the real kernel, or (CPU-only builds) a clear refusal.
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
        assert callable(getattr(pearlmoe.ops, name))


def test_built_with_cuda_matches_torch():
    if pearlmoe.built_with_cuda():
        assert torch.version.cuda is not None
