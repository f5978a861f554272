"""One home for every default: the settings dataclasses of ``scoreflow.lit.settings``, and the YAML that only
overrides them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scoreflow.lit.settings import DequantConfig, EvalConfig, OptimConfig

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
GROUPS = {"optim": OptimConfig, "evaluation": EvalConfig, "dequant": DequantConfig}


def global_content(path: Path) -> dict | None:
    """The YAML of ``path`` as it lands at the root of the config (primary configs and ``@package _global_``
    files), else ``None`` (a group option: its keys land under the group, never under ``module``)."""
    text = path.read_text()
    primary = path.parent == CONF
    if not primary and "@package _global_" not in "\n".join(text.splitlines()[:2]):
        return None
    return yaml.safe_load(text) or {}


def settings_blocks() -> list[tuple[str, str, dict]]:
    """``(file, group, mapping)`` for every ``module.optim`` / ``module.evaluation`` / ``module.dequant`` in
    ``conf/``, and evaluate.yaml's ``evaluation`` overrides."""
    out = []
    for path in sorted(CONF.rglob("*.yaml")):
        content = global_content(path)
        if not content:
            continue
        module = content.get("module") or {}
        for group in GROUPS:
            if isinstance(module.get(group), dict):
                out.append((str(path.relative_to(CONF)), group, module[group]))
        if path.name == "evaluate.yaml":
            out.append(("evaluate.yaml", "evaluation", content["evaluation"]))
    return out


def test_every_yaml_settings_key_is_a_field():
    blocks = settings_blocks()
    files = {f for f, _, _ in blocks}
    # the primary configs and the presets that set these groups: the walk must find them, or it proves nothing
    assert {"train.yaml", "train_classifier.yaml", "train_dequant.yaml", "evaluate.yaml",
            "debug/fast.yaml", "experiment/table2/parts/base.yaml"} <= files, sorted(files)
    bad = []
    for file, group, mapping in blocks:
        fields = {f.name for f in dataclasses.fields(GROUPS[group])}
        bad += [f"{file}: module.{group}.{k}" for k in mapping if k not in fields]
    assert not bad, f"keys that are not fields of their settings class: {bad}"


def test_yaml_only_overrides_the_defaults():
    """train.yaml states only what the default run changes; composed, module.optim is the dataclass's defaults
    with those overrides (and nothing restated with the same value)."""
    from scoreflow.tasks.entry import compose

    cfg = compose("train", [])
    assert OptimConfig.from_mapping(cfg.module.optim) == OptimConfig(lr=6e-3, warmup_steps=100)
    raw = yaml.safe_load((CONF / "train.yaml").read_text())["module"]
    for group in ("optim", "evaluation"):
        defaults = GROUPS[group]()
        cls = GROUPS[group]
        same = [k for k, v in raw[group].items() if getattr(cls.from_mapping({k: v}), k) == getattr(defaults, k)]
        assert not same, f"train.yaml restates defaults of module.{group}: {same}"
    ev = EvalConfig.from_mapping(cfg.module.evaluation)
    assert (ev.method, ev.steps, ev.test_num_t, ev.val_num_t) == ("rk4", 50, 50, 100)


def test_from_mapping_is_strict_and_typed():
    with pytest.raises(ValueError, match=r"unknown module.optim settings \['lrr'\]: lrr \(did you mean lr\?\)"):
        OptimConfig.from_mapping({"lrr": 1e-3})
    with pytest.raises(ValueError, match=r"module.evaluation.test_num_t='many' is not a valid int"):
        EvalConfig.from_mapping({"test_num_t": "many"})
    o = OptimConfig.from_mapping({"lr": "1e-3", "betas": [0.5, 0.9], "warmup_steps": 10.0, "grad_clip": None})
    assert o.lr == 1e-3 and o.betas == (0.5, 0.9) and o.warmup_steps == 10 and o.grad_clip is None
    e = EvalConfig.from_mapping({"method": None, "stratified": "false"})  # a null keeps a non-optional default
    assert e.method == "dopri5" and e.stratified is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.method = "rk4"  # type: ignore[misc]
    assert OptimConfig.from_mapping(o) is o and OptimConfig.from_mapping(o.as_dict()) == o


def test_modules_hold_the_settings():
    """The Lightning modules take a mapping (a config) and hold the typed settings; unknown keys are refused."""
    from scoreflow.lit.classifier_module import ClassifierLitModule
    from scoreflow.nets.classifier import NoiseConditionalClassifier
    from scoreflow.sde import VPSDE

    sde = VPSDE()
    clf = NoiseConditionalClassifier.__new__(NoiseConditionalClassifier)
    clf.sde = sde  # the module only reads .sde at construction
    m = ClassifierLitModule.__new__(ClassifierLitModule)
    with pytest.raises(ValueError, match="unknown module.optim settings"):
        ClassifierLitModule.__init__(m, clf, None, num_levels=None, optim={"lr": 1e-3, "warmup": 5})
    ClassifierLitModule.__init__(m, clf, None, num_levels=None, optim={"lr": 1e-3})
    assert m.optim_cfg == OptimConfig(lr=1e-3) and m.automatic_optimization is False


def test_typo_in_a_settings_key_is_a_clear_error_of_the_real_command():
    r = subprocess.run([sys.executable, "train.py", "module.evaluation.methd=rk4"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "unknown config key 'module.evaluation.methd'" in r.stderr
    assert "did you mean module.evaluation.method" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "train.py", "module.optim.lr=abc"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "module.optim.lr: Value 'abc'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name,file", [("small", "variational"), ("cifar10", "variational_cifar10"),
                                       ("imagenet32", "variational_imagenet32")])
def test_flow_presets_of_the_library_and_the_yaml_agree(name, file):
    """``VariationalDequantizer.from_preset(name)`` (the Python API) and ``dequantization=<file>`` (the CLI) build
    the same flow: every preset key has the same value in both, so the two homes cannot drift apart."""
    from scoreflow.dequantization import PRESETS

    node = yaml.safe_load((CONF / "dequantization" / f"{file}.yaml").read_text())["dequantization"]
    if file != "variational":  # the ScoreFlow sizes inherit the base file and override it
        base = yaml.safe_load((CONF / "dequantization" / "variational.yaml").read_text())["dequantization"]
        node = {**base, **node}
    assert {k: node[k] for k in PRESETS[name]} == PRESETS[name]


def test_the_protocol_names_the_likelihoods_eps():
    """``module.evaluation.eps`` (the likelihoods' smallest time) wins over the training ``eps`` in the protocol
    line of ``metrics.json``, the table and ``test_per_example.npz``: it printed ``eps=sde default`` while the
    numbers were computed from another eps (config-matrix audit)."""
    from omegaconf import OmegaConf

    from scoreflow.lit.settings import protocol_string

    e = dataclasses.asdict(EvalConfig())
    base = {"eps": None, "dequantization": None, "module": {"evaluation": e}}
    assert protocol_string(OmegaConf.create(base)).startswith("eps=sde default,")
    assert protocol_string(OmegaConf.create({**base, "eps": 1e-3})).startswith("eps=0.001,")
    own = {**base, "eps": 1e-3, "module": {"evaluation": {**e, "eps": 1e-4}}}
    assert protocol_string(OmegaConf.create(own)).startswith("eps=0.0001,")
