"""Host time per training batch: scoreflow's DataLoader path against ``datamodule.on_device=true``.

    python bench/data_loading.py                 # CPU; on a CUDA machine also the batches delivered on the GPU

For each data shape (the default digits, CIFAR-10's 49000 x 3x32x32 ``uint8``; random levels, the same sizes) it
times ``--batches`` training batches of ``--batch`` images after a warm-up: the DataLoader train.py builds
(``ResumableSampler``, ``num_workers`` 0 and ``--workers``; on CUDA, pinned and copied to the device as Lightning
does) and :class:`scoreflow.lit.datamodule.DeviceBatches` on each device. Both deliver the same batches; the time
is what the training loop waits for between steps when nothing overlaps it (with workers, the main process's
share). Prints ms per batch and, against ``--step-ms``, the fraction of a training step it would cost.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from scoreflow.data.base import ArrayDataset
from scoreflow.lit.datamodule import DeviceBatches, ResumableSampler, ignore_stop_signals

SHAPES = {"digits (1x8x8, 1297 train)": ((1, 8, 8), 1297), "cifar10 (3x32x32, 49000 train)": ((3, 32, 32), 49000)}


def timed(batches, n: int, warmup: int, device: torch.device) -> float:
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        x, y = next(it)
        if x.device != device:  # what Lightning's batch transfer does with a DataLoader batch
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--workers", type=int, default=4, help="the Table-2 presets' num_workers")
    ap.add_argument("--step-ms", type=float, default=28.4,
                    help="a training step's time: 28.4 ms is DDPM++ at batch 128 at the 4.5k img/s target")
    args = ap.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.batches} batches after {args.warmup}")
    print(f"| data | device | path | ms/batch | % of a {args.step_ms} ms step |")
    print("|---|---|---|---:|---:|")
    for name, (shape, n) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        total = n + 600
        x = torch.randint(0, 256, (total, *shape), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (total,), generator=g)
        ds = ArrayDataset(x, y, torch.randperm(total, generator=g)[:n])
        for device in devices:
            rows = []
            for workers in (0, args.workers):
                loader = DataLoader(ds, batch_size=args.batch, sampler=ResumableSampler(n, 0), drop_last=True,
                                    num_workers=workers, pin_memory=device.type == "cuda",
                                    worker_init_fn=ignore_stop_signals)
                rows.append((f"DataLoader, num_workers={workers}", timed(loader, args.batches, args.warmup, device)))
                del loader
            on_dev = DeviceBatches(x[ds.index].to(device), y[ds.index].to(device), ResumableSampler(n, 0), args.batch)
            rows.append(("on_device (DeviceBatches)", timed(on_dev, args.batches, args.warmup, device)))
            for path, ms in rows:
                print(f"| {name} | {device.type} | {path} | {ms:.3f} | {100 * ms / args.step_ms:.1f} |")


if __name__ == "__main__":
    main()
