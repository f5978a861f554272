"""Task functions behind train.py / evaluate.py / sample.py: compose, instantiate, run, return metrics."""

from scoreflow.tasks.schema import register_schemas

register_schemas()  # before any config is composed: conf/*.yaml name these schemas in their defaults

import scoreflow.tasks.entry  # noqa: E402, F401 - registers ${scoreflow_wandb_group:...} (conf/logger/wandb.yaml)
