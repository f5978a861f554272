"""Sample from a checkpoint: ``python sample.py ckpt_path=PATH [sampler=pc|ode] [num_samples=M] [mode=...] ...``."""

import hydra
from omegaconf import DictConfig

from scoreflow.tasks import validate
from scoreflow.tasks.entry import preflight, register_lazy_resolvers, run

register_lazy_resolvers()  # conf/sample.yaml names its run folder with ${scoreflow_run_subdir:...}


def task(cfg: DictConfig) -> None:
    import scoreflow.tasks.sample as sample

    sample.sample(cfg)


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg, "sample.py", task, validate.sample)


if __name__ == "__main__":
    preflight("sample", validate.sample)
    main()
