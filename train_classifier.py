"""Train a time-dependent classifier for class guidance: ``python train_classifier.py [group=option ...]``."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="train_classifier", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from scoreflow.tasks.train_classifier import train_classifier

    metrics = train_classifier(cfg)
    return metrics.get("test/loss")  # the mixture cross-entropy a Hydra sweeper would minimise


if __name__ == "__main__":
    main()
