"""Train a variational dequantizer after a score model: ``python train_dequant.py score_ckpt=... [key=value ...]``."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="train_dequant", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from scoreflow.tasks.train_dequant import train_dequant

    metrics = train_dequant(cfg)
    return metrics.get("test/bpd_bound")


if __name__ == "__main__":
    main()
