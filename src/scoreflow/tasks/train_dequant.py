"""``train_dequant(cfg)``: train a variational dequantizer AFTER the score model (Song et al. 2021b, Sec. 5.2).

The score model is rebuilt from ``cfg.score_ckpt`` with its EMA weights and frozen; the run's config is the score
run's config with this run's settings merged over it and its ``dequantization`` replaced, so the checkpoint written
describes the whole model (score network + flow) and :func:`module_from_checkpoint` / evaluation rebuild it with the
variational dequantizer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from scoreflow.lit.dequant_module import DequantLitModule
from scoreflow.tasks.build import ConfigError, build_data, build_module, to_container
from scoreflow.tasks.checkpoint import module_from_checkpoint
from scoreflow.tasks.common import (
    ema_in_run,
    fit,
    is_global_zero,
    protocol_string,
    results_table,
    results_title,
    start_run,
    test_checkpoint,
    tested_with_ema,
    write_metrics,
)
from scoreflow.tasks.console import echo, hydra_choices
from scoreflow.tasks.resume import last_checkpoint, resume_candidate
from scoreflow.tasks.validate import (
    SCORE_GROUPS,
    flow_resume,
    not_a_flow_checkpoint,
    other_score_model,
    read_checkpoint,
    score_digest,
)

log = logging.getLogger(__name__)

_RUN_ONLY = ("score_ckpt", "ckpt_path")  # describe this invocation, not the model
_REPLACED = ("dequantization", "trainer", "callbacks", "logger")  # this run's own, not merged with the score run's


def flow_run_config(cfg: DictConfig, score_cfg: DictConfig, digest: str | None = None) -> DictConfig:
    """The score run's config with this run's settings merged over it; the groups in ``_REPLACED`` are replaced.
    ``dequant_run`` records the score model: ``score_ckpt`` and ``score_digest`` (``digest``, of its EMA weights:
    :func:`scoreflow.tasks.validate.score_weights_digest`), which a rerun in the same folder is compared by."""
    own = {k: v for k, v in to_container(cfg).items() if k not in _RUN_ONLY}
    run_cfg = OmegaConf.merge(score_cfg, OmegaConf.create({k: v for k, v in own.items() if k not in _REPLACED}))
    with open_dict(run_cfg):
        for key in _REPLACED:
            run_cfg[key] = OmegaConf.create(own.get(key) or {})
        run_cfg.module.dequant.freeze_score = True  # the "after" mode is what this task is
        # the flow learns its noise on dequantized data, whatever input trained the score model (ScoreFlow: levels)
        run_cfg.module.train_input = "dequantized"
        run_cfg.dequant_run = {"mode": "after", "score_ckpt": str(cfg.score_ckpt)}
        if digest:
            run_cfg.dequant_run.score_digest = digest
    return run_cfg


def flow_run_choices(own: dict[str, str], score: dict[str, str] | None) -> dict[str, str]:
    """The Hydra options of a flow run (stored in its checkpoints): this run's, but the groups the score run decides
    (``sde``, ``model``, ``data``) named as the score run named them, or not at all (a score model written before
    its options were stored: the composed default, ``data=digits``, would name data it was not trained on)."""
    out = {k: v for k, v in own.items() if k not in SCORE_GROUPS}
    out.update({k: v for k, v in (score or {}).items() if k in SCORE_GROUPS})
    return out


def resumed_score_run(cfg: DictConfig, out: Any) -> dict[str, Any] | None:
    """The ``dequant_run`` of the flow checkpoint this run resumes from when it was trained after another score
    model than ``score_ckpt`` and ``resume_allow_changes`` lets it through: Lightning's restore puts that
    checkpoint's score weights back, so the run is recorded with its score model. None otherwise."""
    if not OmegaConf.select(cfg, "resume_allow_changes", default=False):
        return None
    path = resume_candidate(cfg, out)
    if path is None or not path.is_file():
        return None
    ckpt = read_checkpoint(path)
    run = ((ckpt.get("scoreflow") or {}).get("config") or {}).get("dequant_run")
    if isinstance(run, dict) and other_score_model(ckpt, cfg.score_ckpt):
        log.warning("resume_allow_changes: %s was trained after the score model %s, whose weights its restore puts "
                    "back in place of score_ckpt=%s; the run records that score model", path, run.get("score_ckpt"),
                    cfg.score_ckpt)
        return dict(run)
    return None


def train_dequant(cfg: DictConfig) -> dict[str, Any]:
    """Train φ with the frozen score model, write ``checkpoints/last.ckpt`` and ``metrics.json``, return the metrics."""
    t0 = time.time()
    # the preflight's check again, before the run starts (multiruns and callers of this function skip the preflight)
    score_meta = read_checkpoint(cfg.score_ckpt, "score_ckpt").get("scoreflow") or {}
    not_a_flow_checkpoint(score_meta.get("config") or {}, cfg.score_ckpt)
    if cfg.get("ckpt_path"):  # a flow of the same score model (a rerun in the run folder: fit's resume_path checks)
        flow_resume(cfg)
    out = start_run(cfg)
    score, score_cfg, _ = module_from_checkpoint(cfg.score_ckpt, use_ema=True)
    run_cfg = flow_run_config(cfg, score_cfg, score_digest(cfg.score_ckpt))
    if (kept := resumed_score_run(cfg, out)) is not None:
        with open_dict(run_cfg):
            run_cfg.dequant_run = kept
    source = build_data(run_cfg)
    module = build_module(run_cfg)
    if not isinstance(module, DequantLitModule):
        raise ConfigError(f"dequantization={type(module.dequantizer).__name__} has nothing to train after the score "
                          "model: use dequantization=variational")
    module.score_model.load_state_dict(score.score_model.state_dict())  # the frozen EMA weights
    module.config_choices = flow_run_choices(hydra_choices(), score_meta.get("choices"))
    module.output_dir = str(out)

    metrics, _ = fit(cfg, module, source, out, t0, run_cfg=run_cfg)
    ema = ema_in_run(run_cfg)  # what validation evaluated
    if cfg.get("test", True):
        final = last_checkpoint(out)
        ema = tested_with_ema(final)
        metrics.update(test_checkpoint(run_cfg, final, out, use_ema=ema))
    metrics["wall_time_s"] = time.time() - t0
    metrics["dequantization"] = f"{type(module.dequantizer).__name__} (trained after the score model)"
    if not is_global_zero():  # strategy=ddp: rank 0 writes and reports
        return metrics
    write_metrics(out / "metrics.json", {**metrics, "protocol": protocol_string(run_cfg)})
    # as train.py: test=false shows the last validation (bound on val_subset images, ODE on nll_subset) as such
    tested = bool(cfg.get("test", True))
    shown = metrics if tested else {"test/" + k[4:]: v for k, v in metrics.items() if k.startswith("val/")}
    steps = int(metrics["train/steps"])
    title = results_title(tested, module, metrics, steps, run_cfg.get("val_every"))
    echo(results_table(shown, title=f"{title}, frozen score model + {'EMA' if ema else 'raw'} flow ({out})", extra={
        "dequantization": metrics["dequantization"], "score model": str(run_cfg.dequant_run.score_ckpt),
        "flow steps": steps, "wall time": f"{metrics['wall_time_s']:.0f} s",
        # the eps-correction of protocol_string is the bound's; the ODE NLL never has it (evaluate.py can)
        "protocol": protocol_string(run_cfg) + "; the ODE NLL without eps-correction",
    }))
    return metrics
