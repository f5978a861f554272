"""``bench/profile_step.py``: kernel names from a real H200 profile land in the right kind, and the script runs on
a CPU and prints its table by kind, where an MLP's matrix products are found (timings themselves are not judged)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from profile_step import OTHER, kind  # noqa: E402


@pytest.mark.parametrize("name, want", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "matmul"),
    ("sm90_xmma_wgrad_indexed_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc", "matmul"),
    ("fmha_cutlassB_f32_aligned_128x64_k65536_sm80(PyTorchMemEffAttention::AttentionBackwardKernel", "matmul"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<float, float, float, false, true, (cudnnKernelDataType_t)2>",
     "layout"),
    ("void cudnn::engines_precompiled::nhwcToNchwKernel<__nv_bfloat16, __nv_bfloat16, float, true, false>", "layout"),
    ("triton_per_fused_native_group_norm_silu_0", "Inductor"),
    ("triton_poi_fused_add_convolution_mul_12", "Inductor"),
    ("triton_tem_fused_convolution_3", "matmul"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float, float>", "normalization"),
    ("void at::native::(anonymous namespace)::ComputeInternalGradientsCUDAKernel<float>", "normalization"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl<direct_copy_kernel_cuda", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel", OTHER),
])
def test_kernel_kinds(name, want):
    assert kind(name).startswith(want)


def test_runs_on_cpu_and_the_kinds_add_up():
    r = subprocess.run([sys.executable, "bench/profile_step.py", "--model", "mlp", "--batch", "16", "--steps", "1",
                        "--rows", "3", "--ema"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    part = r.stdout.split("by kind", 1)[1]
    shares = dict(re.findall(r"^  (\S.*?)\s+[\d.]+ ms\s+([\d.]+) %$", part, flags=re.M))
    # an MLP's step is mostly its matrix products (aten::addmm/mm): a classification that missed them shows 0
    assert float(shares["matmul (conv, GEMM, attention)"]) > 20, part
    assert "matmul kernels alone" in part
