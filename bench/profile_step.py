"""Where the time of one training step goes, for one model and set of options: the kernels by total time, then the
step's device time by kind of kernel, and what the step would run at if everything but the convolutions and matrix
products took no time (the ceiling that fusing the memory-bound rest can approach).

    python bench/profile_step.py --model ddpmpp --batch 128 --amp bf16 --channels-last
    python bench/profile_step.py --model ddpmpp --batch 128 --amp bf16 --compile --fused-adam --ema  # speed=gpu

The step is ``bench/train_step.py``'s (the same options). ``--compile`` profiles Inductor's default mode: the kernels
of ``--compile-mode reduce-overhead`` are the same, replayed as CUDA graphs (which the profiler may not break down).
On a CPU the table lists operators rather than kernels.
"""

from __future__ import annotations

import argparse
import re

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from train_step import make_step  # the script directory (bench/) is on sys.path

from scoreflow.lit.throughput import peak_flops

# Kinds of kernel (CUDA names) or operator (CPU), first match wins (Inductor's names list the ops they fuse): what
# fusing can remove (layout, copy, norm, elementwise) against what it cannot (matmul: cuDNN/CUTLASS convolutions,
# cuBLAS GEMMs, attention, and max-autotune's triton templates, triton_tem_*).
KINDS = (
    ("Inductor-fused (triton/cpp)", r"^triton_(?!tem)|^cpp_fused|compiledfxgraph"),
    ("layout (NCHW<->NHWC)", r"nchwtonhwc|nhwctonchw|transpose|permute|convert.*layout"),
    ("matmul (conv, GEMM, attention)",
     r"^triton_tem|xmma|gemm|conv|cutlass|wgrad|dgrad|fprop|implicit|cudnn|flash|fmha|attention|aten::mm|aten::bmm|aten::addmm"),
    ("optimizer / EMA", r"adam|multi_tensor|foreach|lerp"),
    ("normalization", r"norm|moments|welford|computeinternalgr"),
    ("copy / cast", r"copy|cast|^aten::to$|catarray"),
)
OTHER = "other elementwise / reduction"


def kind(name: str) -> str:
    low = name.lower()
    for label, pattern in KINDS:
        if re.search(pattern, low):
            return label
    return OTHER


def by_kind(events, device: bool) -> dict[str, float]:
    """Self time (µs) per kind: the device's kernels (``device``) or the CPU's ``aten::`` operators."""
    out: dict[str, float] = {}
    for e in events:
        if device:
            if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
                continue  # kernels only: an annotation (Optimizer.step#Adam.step) spans kernels counted already
            t = e.self_device_time_total
        else:
            if e.device_type != DeviceType.CPU or not (e.key.startswith("aten::") or "CompiledFxGraph" in e.key):
                continue
            t = e.self_cpu_time_total
        if t > 0:
            out[kind(e.key)] = out.get(kind(e.key), 0.0) + t
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ddpmpp")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: Inductor's default mode)")
    p.add_argument("--fused-adam", action="store_true", help="Adam(fused=True)")
    p.add_argument("--ema", action="store_true", help="also the EMA update in each step")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--rows", type=int, default=18)
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    step, _, flops = make_step(args.model, args.batch, dev, args)
    for _ in range(3):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    on_device = dev.type == "cuda"
    key = "self_cuda_time_total" if on_device else "self_cpu_time_total"
    print(f"== {args.model} batch {args.batch} amp={args.amp} channels_last={args.channels_last} "
          f"compile={args.compile}{'/' + args.compile_mode if args.compile_mode else ''} fused_adam={args.fused_adam} "
          f"ema={args.ema} ({args.steps} steps)")
    print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    kinds = by_kind(events, on_device)
    total = sum(kinds.values())
    if not total:
        print("no kernel times recorded (CUDA graphs replay outside the profiler's view: profile without them)")
        return
    where = "device time (kernels)" if on_device else "CPU time (aten operators, self)"
    print(f"== {where} per step, by kind")
    for label, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {label:34s} {t / args.steps / 1e3:9.2f} ms  {100 * t / total:5.1f} %")
    per_step = total / args.steps / 1e6  # seconds
    mm = kinds.get("matmul (conv, GEMM, attention)", 0.0) / args.steps / 1e6
    print(f"  {'total':34s} {per_step * 1e3:9.2f} ms  -> {args.batch / per_step:8.1f} img/s if nothing else waited")
    if mm > 0:
        peak = peak_flops(dev, torch.bfloat16 if args.amp == "bf16" else torch.float32)
        rate = flops / mm
        share = f" ({100 * rate / peak:.1f} % of the dense peak)" if peak else ""
        print(f"  matmul kernels alone: {mm * 1e3:.2f} ms = {args.batch / mm:.1f} img/s, {rate / 1e12:.2f} TFLOP/s on "
              f"the step's {flops / 1e12:.3f} TFLOP{share}: the ceiling with every other kernel fused away")


if __name__ == "__main__":
    main()
