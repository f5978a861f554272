"""Train a score-based diffusion model: ``python train.py [group=option ...] [key=value ...]``."""

import hydra
from omegaconf import DictConfig

from scoreflow.tasks import validate
from scoreflow.tasks.entry import preflight, run


def task(cfg: DictConfig) -> float | None:
    from scoreflow.tasks.common import optimized_metric
    from scoreflow.tasks.train import train

    return optimized_metric(cfg, train(cfg))  # the value a Hydra sweeper minimises (cfg.optimized_metric)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg, "train.py", task, validate.train)


if __name__ == "__main__":
    preflight("train", validate.train)
    main()
