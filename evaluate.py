"""Evaluate a checkpoint: ``python evaluate.py ckpt_path=PATH [split=test] [repeats=K] [fid.num_samples=N] ...``."""

import hydra
from omegaconf import DictConfig

import scoreflow.tasks.evaluate as task  # also registers the run-directory resolver used by conf/evaluate.yaml


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    metrics = task.evaluate(cfg)
    return metrics.get(f"{cfg.split}/bpd_ode")


if __name__ == "__main__":
    main()
