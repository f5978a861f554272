"""Train a variational dequantizer after a score model: ``python train_dequant.py score_ckpt=... [key=value ...]``."""

import hydra
from omegaconf import DictConfig

from scoreflow.tasks import validate
from scoreflow.tasks.entry import preflight, run


def task(cfg: DictConfig) -> float | None:
    from scoreflow.tasks.train_dequant import train_dequant

    return train_dequant(cfg).get("test/bpd_bound")


@hydra.main(config_path="conf", config_name="train_dequant", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg, "train_dequant.py", task, validate.train_dequant)


if __name__ == "__main__":
    preflight("train_dequant", validate.train_dequant)
    main()
