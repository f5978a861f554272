"""Train a score-based diffusion model: ``python train.py [group=option ...] [key=value ...]``."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from scoreflow.tasks.train import train

    metrics = train(cfg)
    return metrics.get("test/bpd_ode")  # the value a Hydra sweeper would minimise


if __name__ == "__main__":
    main()
