"""Task functions behind train.py / evaluate.py / sample.py: compose, instantiate, run, return metrics."""

from scoreflow.tasks.schema import register_schemas

register_schemas()  # before any config is composed: conf/*.yaml name these schemas in their defaults
