"""Train a time-dependent classifier for class guidance: ``python train_classifier.py [group=option ...]``."""

import hydra
from omegaconf import DictConfig

from scoreflow.tasks import validate
from scoreflow.tasks.entry import preflight, run


def task(cfg: DictConfig) -> float | None:
    from scoreflow.tasks.train_classifier import train_classifier

    return train_classifier(cfg).get("test/loss")  # the mixture cross-entropy a Hydra sweeper would minimise


@hydra.main(config_path="conf", config_name="train_classifier", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg, "train_classifier.py", task, validate.train_classifier)


if __name__ == "__main__":
    preflight("train_classifier", validate.train_classifier)
    main()
