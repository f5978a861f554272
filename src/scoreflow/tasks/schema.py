"""The settings dataclasses of :mod:`scoreflow.lit.settings` as Hydra schemas.

``conf/train.yaml`` (and the other task configs) list ``schema/optim@module.optim`` etc. first in their defaults,
so the dataclass defaults come first and the YAML only overrides them; the merged node stays typed, so a key
that is not a field (``module.optim.lrr=1``) or a value of the wrong type (``module.optim.lr=abc``) is an
error when the config is composed.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from scoreflow.lit.settings import SCHEMAS


def register_schemas() -> None:
    """Store each settings class as ``schema/<name>: default`` in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for name, cls in SCHEMAS.items():
        node = OmegaConf.structured(cls)
        OmegaConf.set_readonly(node, False)  # frozen in Python; Hydra merges the YAML into it
        cs.store(group=f"schema/{name}", name="default", node=node)
