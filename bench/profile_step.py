"""Where the time of one training step goes (CUDA kernels by total time), for one model and set of options.

    python bench/profile_step.py --model ddpmpp --batch 128 --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from train_step import SHAPES, build  # the script directory (bench/) is on sys.path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="ddpmpp")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--rows", type=int, default=18)
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    shape = SHAPES.get(args.model, (3, 32, 32))
    net = build(args.model, shape).to(dev)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    x = torch.randn(args.batch, *shape, device=dev).contiguous(memory_format=fmt)
    label = torch.rand(args.batch, device=dev) * 999

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            loss = (net(x, label).float() - x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(f"== {args.model} batch {args.batch} amp={args.amp} channels_last={args.channels_last} (3 steps)")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
