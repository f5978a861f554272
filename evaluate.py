"""Evaluate a checkpoint: ``python evaluate.py ckpt_path=PATH [split=test] [repeats=K] [fid.num_samples=N] ...``."""

import hydra
from omegaconf import DictConfig

from scoreflow.tasks import validate
from scoreflow.tasks.entry import preflight, register_lazy_resolvers, run

register_lazy_resolvers()  # conf/evaluate.yaml names its run folder with ${scoreflow_run_subdir:...}


def task(cfg: DictConfig) -> float | None:
    import scoreflow.tasks.evaluate as evaluate

    return evaluate.evaluate(cfg).get(f"{cfg.split}/bpd_ode")


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg, "evaluate.py", task, validate.evaluate)


if __name__ == "__main__":
    preflight("evaluate", validate.evaluate)
    main()
