"""``train_classifier(cfg)``: fit a time-dependent classifier ``p_t(y | x_t)`` for class guidance (App. I.1).

The classifier is assembled by :func:`~scoreflow.tasks.build.build_classifier_module` (data source -> SDE ->
network -> NoiseConditionalClassifier -> dequantizer -> ClassifierLitModule). The checkpoint stores the resolved
config (SDE, data scaling, network, number of classes), so :func:`~scoreflow.tasks.checkpoint.load_classifier`
rebuilds the classifier from it alone, and can check it against the score model it is meant to guide: a classifier
is only valid for the SDE and data scaling it was trained on.
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from scoreflow.lit.classifier_module import ClassifierLitModule, fixed_time_key
from scoreflow.tasks.build import build_classifier_module, build_data, check_shapes
from scoreflow.tasks.checkpoint import (  # noqa: F401 (re-exported: this module was their home)
    classifier_module_from_checkpoint,
    load_classifier,
)
from scoreflow.tasks.common import (
    ema_in_run,
    fit,
    is_global_zero,
    start_run,
    test_checkpoint,
    tested_with_ema,
    write_metrics,
)
from scoreflow.tasks.console import echo, hydra_choices
from scoreflow.tasks.resume import last_checkpoint


def train_classifier(cfg: DictConfig) -> dict[str, float]:
    """Train, write ``checkpoints/last.ckpt`` and ``metrics.json``, print accuracy per noise level; return metrics."""
    t0 = time.time()
    out = start_run(cfg)
    source = build_data(cfg)
    module = build_classifier_module(cfg, source)
    module.config_choices = hydra_choices()  # stored in its checkpoints: which options the run was composed of
    check_shapes(module, tuple(cfg.data.shape))

    metrics, loggers = fit(cfg, module, source, out, t0)
    ema = ema_in_run(cfg)  # what validation evaluated
    if cfg.get("test", True):
        final = last_checkpoint(out)
        ema = tested_with_ema(final, bool(cfg.get("use_ema", True)))
        metrics.update(test_checkpoint(cfg, final, out, kind="classifier", use_ema=ema, source=source,
                                       logger=loggers or False))
    metrics["wall_time_s"] = time.time() - t0
    if not is_global_zero():  # strategy=ddp: rank 0 writes and reports
        return metrics
    write_metrics(out / "metrics.json", metrics)
    echo(accuracy_table(metrics, module, title=f"noise-conditional classifier ({out})", ema=ema))  # console and run log
    return metrics


def accuracy_table(metrics: dict[str, float], module: ClassifierLitModule, title: str, *, ema: bool) -> str:
    """Accuracy and cross-entropy at each fixed ``t`` (test split if evaluated, else validation), of the EMA weights
    or (``ema=False``) the raw ones (it said EMA for the test split and raw for validation, whatever they were)."""
    split = "test" if any(k.startswith("test/") for k in metrics) else "val"
    sde = module.sde
    rows = [f"== {title} ==", f"  {split} split ({'EMA' if ema else 'raw'} weights), "
            f"{type(sde).__name__}, chance = {1 / module.classifier.num_classes:.3f}",
            f"  {'t':>6}  {'sigma_t':>8}  {'alpha_t':>8}  {'accuracy':>8}  {'CE (nats)':>9}"]
    for t in module.eval_times:
        alpha, sigma = (float(v) for v in sde.marginal(torch.tensor([t])))
        acc, ce = metrics.get(fixed_time_key(split, "acc", t)), metrics.get(fixed_time_key(split, "loss", t))
        acc_s = f"{acc:8.3f}" if acc is not None else f"{'-':>8}"
        ce_s = f"{ce:9.3f}" if ce is not None else f"{'-':>9}"
        rows.append(f"  {t:6g}  {sigma:8.4f}  {alpha:8.4f}  {acc_s}  {ce_s}")
    if f"{split}/acc" in metrics:
        rows.append(f"  t ~ U[eps, T]: accuracy {metrics[f'{split}/acc']:.3f}, CE {metrics[f'{split}/loss']:.3f} nats")
    rows.append(f"  steps {int(metrics['train/steps'])}, training {metrics['train/wall_time_s']:.0f} s, "
                f"total {metrics['wall_time_s']:.0f} s")
    return "\n".join(rows)

