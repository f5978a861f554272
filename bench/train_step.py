"""Throughput of one training step (forward + backward + Adam) for each ``conf/model`` net.

    python bench/train_step.py                                   # every model, CPU batch sizes
    python bench/train_step.py --models ddpmpp ncsnpp --batch 128 --amp bf16 --channels-last [--compile]

Prints images/s, the counted FLOPs of forward + backward (``FlopCounterMode``: 2 per multiply-add), the
achieved FLOP/s and, on a known GPU, the fraction of its dense peak (bf16 with ``--amp bf16``, else TF32).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from scoreflow.lit.throughput import peak_flops  # the dense peaks train.py reports MFU against

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
MODELS = ["mlp", "unet_small", "ddpmpp", "ddpmpp_deep", "ncsnpp", "ncsnpp_deep"]
SHAPES = {"mlp": (2,), "unet_small": (1, 8, 8)}  # others: CIFAR-10 (3, 32, 32)
CPU_BATCH = {"mlp": 512, "unet_small": 128}  # others: 2 on CPU


def build(name: str, shape: tuple[int, ...]) -> torch.nn.Module:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    return hydra.utils.instantiate(cfg.net, shape=shape)


def make_step(name: str, batch: int, device: torch.device, args: argparse.Namespace):
    """The training step of ``name`` at ``batch`` with the options of ``args`` (``amp``, ``channels_last``, ``compile``,
    ``compile_mode``, ``fused_adam``, ``ema``): returns ``(step, net, flops)``, ``flops`` those of one forward +
    backward counted by ``FlopCounterMode`` (2 per multiply-add). ``bench/profile_step.py`` profiles the same step."""
    shape = SHAPES.get(name, (3, 32, 32))
    torch.manual_seed(0)
    net = build(name, shape).to(device)
    fmt = torch.channels_last if args.channels_last and len(shape) == 3 else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, fused=args.fused_adam or None)
    ema = [p.detach().clone() for p in net.parameters()] if args.ema else None
    x = torch.randn(batch, *shape, device=device).contiguous(memory_format=fmt)
    noise = torch.randn_like(x)
    label = torch.rand(batch, device=device) * 999
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    step_net = torch.compile(net, mode=args.compile_mode) if args.compile else net

    def step() -> None:
        with amp:
            loss = (step_net(x, label).float() - noise).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:  # the EMA update of every training step, fused over all tensors
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - 0.9999)

    with FlopCounterMode(display=False) as counter:
        with amp:
            loss = (net(x, label).float() - noise).square().mean()
        loss.backward()
    opt.zero_grad(set_to_none=True)
    return step, net, counter.get_total_flops()


def bench(name: str, batch: int, device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    shape = SHAPES.get(name, (3, 32, 32))
    step, net, flops = make_step(name, batch, device, args)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    achieved = flops / dt
    peak = peak_flops(device, torch.bfloat16 if args.amp == "bf16" else torch.float32)  # fp32: TF32 if enabled
    n_params = sum(p.numel() for p in net.parameters())
    print(
        f"{name:12s} {str(list(shape)):12s} batch {batch:4d}  params {n_params / 1e6:7.2f} M  "
        f"fwd+bwd {flops / batch / 1e9:8.3f} GFLOP/img  {batch / dt:9.1f} img/s  {dt * 1e3:8.1f} ms/step  "
        f"{achieved / 1e12:7.3f} TFLOP/s" + (f"  {100 * achieved / peak:5.1f}% of peak" if peak else ""),
        flush=True,
    )
    return {"img_per_s": batch / dt, "flops": flops, "tflops": achieved / 1e12}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batch", type=int, default=None, help="default: 128 on GPU; CPU_BATCH or 2 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode: default, reduce-overhead (CUDA graphs), "
                   "max-autotune, max-autotune-no-cudagraphs")
    p.add_argument("--fused-adam", action="store_true", help="Adam(fused=True)")
    p.add_argument("--ema", action="store_true", help="also the EMA update (torch._foreach_lerp_) in each step")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {name}  torch {torch.__version__}  amp={args.amp} channels_last={args.channels_last} "
        f"compile={args.compile}{'/' + args.compile_mode if args.compile_mode else ''} fused_adam={args.fused_adam} "
        f"ema={args.ema}"
    )
    for m in args.models:
        default = 128 if device.type == "cuda" else CPU_BATCH.get(m, 2)
        bench(m, args.batch or default, device, args)


if __name__ == "__main__":
    main()
