"""Steps/s of the Table-2 pipeline itself (Lightning, EMA, clipping, data loading), score model and dequantizer.

    python bench/table2_throughput.py                     # on a GPU: ddpmpp and ddpmpp_deep, both flow presets
    python bench/table2_throughput.py --steps 3 --warmup 1 --extra model.net.nf=16 model.net.num_res_blocks=1

Writes random CIFAR-10 python pickles (the content does not change the speed), then runs
``train.py experiment=table2/cifar10_vp_lw_is`` and ``.../cifar10_deep_vp_lw_is`` and, on each checkpoint,
``train_dequant.py +experiment=table2/dequant_cifar10`` (3.47 M flow) and ``dequantization=variational_imagenet32``
(35.5 M flow; 32x32x3 like ImageNet32) for ``warmup + steps`` optimizer steps each, timing the last ``steps``
(CUDA-synchronized) with a callback. Prints images/s and the hours of a full run at that rate; ``--json`` saves it.
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
FULL_STEPS = {"score": {"ddpmpp": 1_300_000, "ddpmpp_deep": 950_000}, "dequant": 300_000}


class StepTimer(pl.Callback):
    """Writes to ``path`` the mean wall time of optimizer steps after the first ``warmup`` (CUDA-synchronized).
    Added to a run by config: ``+callbacks.timer._target_=table2_throughput.StepTimer``."""

    def __init__(self, warmup: int, path: str):
        self.warmup, self.path, self.times = int(warmup), Path(path), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        t = self.times[self.warmup :]
        self.path.write_text(json.dumps({"s_per_step": (t[-1] - t[0]) / (len(t) - 1), "steps": len(t) - 1}))


def write_cifar(root: Path, n_per_batch: int) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", 256)]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(d / name, "wb") as fh:
            pickle.dump({b"data": x, b"labels": [int(v) for v in rng.integers(0, 10, n)]}, fh, protocol=2)
    return root


def compose_cfg(config_name: str, overrides: list[str], run_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
        cfg.hydra.job.override_dirname = "bench"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def timed(task, config_name: str, overrides: list[str], run_dir: Path, warmup: int):
    """Compose ``config_name`` with a :class:`StepTimer`, run ``task``; ``(seconds per step, cfg)``."""
    out = run_dir / "step_time.json"
    cfg = compose_cfg(config_name, [*overrides, "+callbacks.timer._target_=table2_throughput.StepTimer",
                                    f"+callbacks.timer.warmup={warmup}", f"+callbacks.timer.path={out}"], run_dir)
    task(cfg)
    return json.loads(out.read_text())["s_per_step"], cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--presets", nargs="+", default=["cifar10_vp_lw_is", "cifar10_deep_vp_lw_is"])
    ap.add_argument("--extra", nargs="*", default=[], help="extra overrides of the score runs (tests)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.steps < 2:  # StepTimer: the mean interval between the ends of the timed steps, steps - 1 of them
        ap.error(f"--steps must be at least 2 (got {args.steps}): the time per step is measured between the ends of "
                 "the first and the last timed step")
    if args.warmup < 0:
        ap.error(f"--warmup must be at least 0 (got {args.warmup})")
    from scoreflow.tasks.train import train
    from scoreflow.tasks.train_dequant import train_dequant

    n = args.warmup + args.steps
    cpu = not torch.cuda.is_available()
    common = [f"trainer.max_steps={n}", "val_every=1000000", "sample_every=0", "checkpoint_every=1000000",
              "logger=none", "test=false", "datamodule.num_workers=4"]
    if cpu:
        common += ["trainer.accelerator=cpu", "datamodule.batch_size=2", "datamodule.num_workers=0"]
    device = torch.cuda.get_device_name() if not cpu else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_cifar(Path(tmp) / "cifar10", 2000 if not cpu else 8)
        for preset in args.presets:
            run = Path(tmp) / preset
            s, cfg = timed(train, "train", [f"experiment=table2/{preset}", f"data.root={data}", "data.val_size=8",
                                            *common, *args.extra], run, args.warmup)
            model, batch = cfg.table2.model, int(cfg.datamodule.batch_size)
            rows.append({"run": f"train.py experiment=table2/{preset}", "model": model, "batch": batch,
                         "s_per_step": s, "img_per_s": batch / s, "full_run_h": FULL_STEPS["score"][model] * s / 3600})
            for flow in ("variational_cifar10", "variational_imagenet32"):
                s, _ = timed(train_dequant, "train_dequant",
                             ["+experiment=table2/dequant_cifar10", f"dequantization={flow}",
                              f"score_ckpt={run / 'checkpoints' / 'last.ckpt'}", *common],
                             Path(tmp) / f"{preset}_{flow}", args.warmup)
                rows.append({"run": f"train_dequant.py dequantization={flow} on {preset}", "model": model,
                             "batch": batch, "s_per_step": s, "img_per_s": batch / s,
                             "full_run_h": FULL_STEPS["dequant"] * s / 3600})
            if not cpu:
                torch.cuda.empty_cache()
    print(f"\n{device}, torch {torch.__version__}, fp32 (trainer=gpu default), {args.steps} timed steps after "
          f"{args.warmup}")
    print(f"{'run':<75} {'batch':>5} {'img/s':>8} {'full run (h)':>13}")
    for r in rows:
        print(f"{r['run']:<75} {r['batch']:>5} {r['img_per_s']:>8.1f} {r['full_run_h']:>13.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
