"""A run trained without the EMA callback (``~callbacks.ema``, ``callbacks=none``) holds raw weights only: its test
phase evaluates them and says so (it raised ``KeyError: checkpoint has no EMA state`` after training), and
``evaluate.py`` / ``sample.py`` on its checkpoint refuse the default ``use_ema=true`` on one screen naming the fix
(they printed that KeyError's traceback), while ``use_ema=false`` evaluates it."""

from __future__ import annotations

import contextlib
import io

import pytest

from scoreflow.tasks.evaluate import evaluate
from scoreflow.tasks.train import train
from tests.integration.conftest import compose_cfg
from tests.integration.test_entry_errors import check_screen, cli


@pytest.fixture(scope="module")
def raw_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("noema")
    cfg = compose_cfg(["debug=fast", "~callbacks.ema", "trainer.max_steps=4", "val_every=2", "sample_every=0",
                       "module.evaluation.nll_every=0", "datamodule.test_subset=4"], d / "run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        metrics = train(cfg)
    return d, metrics, out.getvalue()


def test_the_test_phase_of_a_run_without_ema_evaluates_its_raw_weights_and_says_so(raw_ckpt):
    d, metrics, printed = raw_ckpt
    ckpt = d / "run" / "checkpoints" / "last.ckpt"
    assert metrics["test/bpd_ode"] == metrics["test/bpd_ode"] and metrics["test/bpd_bound"] > 0
    assert "== test split, raw weights (no EMA) (" in printed
    m = evaluate(compose_cfg([f"ckpt_path={ckpt}", "use_ema=false", "num_images=4", "progress=false", "device=cpu",
                              "solver_check_images=0"], d / "ev", config_name="evaluate"))
    assert m["test/bpd_bound"] == pytest.approx(metrics["test/bpd_bound"], rel=1e-6)  # the same raw weights


@pytest.mark.parametrize("script", ["evaluate.py", "sample.py"])
def test_evaluate_and_sample_refuse_use_ema_on_a_checkpoint_without_ema_on_one_screen(raw_ckpt, tmp_path, script):
    d = raw_ckpt[0]
    code, lines = cli(script, [f"ckpt_path={d / 'run' / 'checkpoints' / 'last.ckpt'}", "num_images=2"
                               if script == "evaluate.py" else "num_samples=2"], tmp_path)
    check_screen(code, lines, 2, "holds no EMA weights", "~callbacks.ema", "use_ema=false")
