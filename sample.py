"""Sample from a checkpoint: ``python sample.py ckpt_path=PATH [sampler=pc|ode] [num_samples=M] [mode=...] ...``."""

import hydra
from omegaconf import DictConfig

import scoreflow.tasks.sample as task  # also registers the run-directory resolver used by conf/sample.yaml


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    task.sample(cfg)


if __name__ == "__main__":
    main()
