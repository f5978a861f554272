"""Runs that survive restarts: which checkpoint a run resumes from, its W&B run id, and what to rerun.

A run is its directory. ``<run dir>/checkpoints/last.ckpt`` is written every ``checkpoint_every`` steps, on a
pre-emption signal (``scoreflow.lit.preemption``) and at the end; with ``auto_resume=true`` the same command run
again in the same directory resumes from it. The directory is the same when SLURM requeues a job launched with
``-m hydra/launcher=slurm`` (Hydra copies the sweep's resolved timestamp into every job) and, on a workstation,
when the command is rerun with the ``hydra.run.dir=...`` (or ``hydra.sweep.dir=...``) the stop message names.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from scoreflow.tasks.console import hydra_config
from scoreflow.tasks.errors import CheckpointError
from scoreflow.tasks.validate import IDENTITY_GROUPS, config_differences, other_score_model

log = logging.getLogger(__name__)


def last_checkpoint(out: Path) -> Path:
    return Path(out) / "checkpoints" / "last.ckpt"


ORIGIN_KEY = "scoreflow_origin"  # in every checkpoint of a run started from ckpt_path=: that file, resolved


def run_origin(cfg: DictConfig, resumed: str | Path | None) -> str | None:
    """The ``ckpt_path=`` a run started from (resolved), carried over by its resumes: ``cfg.ckpt_path``, else the
    origin stored in the checkpoint it resumes from. ``scoreflow.tasks.common.RunOrigin`` stores it."""
    if cfg.get("ckpt_path"):
        return str(Path(str(cfg.ckpt_path)).expanduser().resolve())
    return _stored_origin(resumed) if resumed else None


def _stored_origin(path: str | Path) -> str | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(ORIGIN_KEY)
    except Exception:  # noqa: BLE001 - unreadable: no origin (check_same_run names the file)
        return None


def resume_candidate(cfg: DictConfig, out: Path) -> Path | None:
    """The checkpoint a run in ``out`` resumes from: with ``cfg.auto_resume``, the run folder's ``last.ckpt`` if
    one exists and the command names no other ``ckpt_path``, or names the one that folder's run started from (the
    same command run again after a stop or a requeue continues where it stopped instead of starting over); else
    ``cfg.ckpt_path`` when given. No check and no log line (:func:`resume_path` adds them)."""
    last = last_checkpoint(out)
    own = cfg.get("auto_resume", True) and last.is_file()
    if cfg.get("ckpt_path"):
        given = Path(str(cfg.ckpt_path))
        if own and given.expanduser().resolve() != last.resolve() and _stored_origin(last) == run_origin(cfg, None):
            return last
        return given
    return last if own else None


def resume_path(cfg: DictConfig, out: Path) -> str | None:
    """:func:`resume_candidate`, the folder's own ``last.ckpt`` refused by :func:`check_same_run` when it was
    trained with another sde, model, data or dequantization, and the auto-resume logged."""
    path = resume_candidate(cfg, out)
    if path is None or (cfg.get("ckpt_path") and path != last_checkpoint(out)):
        return None if path is None else str(path)
    check_same_run(path, cfg)
    if cfg.get("ckpt_path"):
        log.info("auto_resume: resuming from %s, where the run that started from ckpt_path=%s stopped (it does not "
                 "start over; auto_resume=false does)", path, cfg.ckpt_path)
    else:
        log.info("auto_resume: resuming from %s", path)
    return str(path)


def check_same_run(ckpt_path: Path, cfg: DictConfig) -> None:
    """The folder's checkpoint must be of the requested sde/model/data/dequantization (the test ``ckpt_path=``
    gets in ``validate.resume``) and seed, and a train_dequant.py flow must have been trained after the requested
    ``score_ckpt`` (its score weights: :func:`scoreflow.tasks.validate.other_score_model`), unless
    ``resume_allow_changes``."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated (a disk filled mid-copy), overwritten, not a checkpoint
        raise CheckpointError(
            f"this run folder holds {ckpt_path}, which cannot be read as a checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''})", key="auto_resume", value=True,
            fix="auto_resume=false to start afresh here (overwriting it), or ckpt_path=<an intact checkpoint> to "
                "resume from that") from e
    stored = (ckpt.get("scoreflow") or {}).get("config")
    if not stored or OmegaConf.select(cfg, "resume_allow_changes", default=False):
        return
    allow = "resume_allow_changes=true" if "resume_allow_changes" in cfg else "+resume_allow_changes=true"
    score_ckpt = OmegaConf.select(cfg, "score_ckpt", default=None, throw_on_missing=False)
    if isinstance(stored.get("dequant_run"), dict) and score_ckpt not in (None, "", "???"):
        # Lightning's restore would put the flow run's score weights back over those of score_ckpt, which the run's
        # config (dequant_run) and results table would then name
        change = other_score_model(ckpt, score_ckpt)
        if change:
            raise CheckpointError(
                f"this run folder already holds {ckpt_path}, a flow trained after another score model (stored -> "
                f"score_ckpt): {change}; resuming would put the old score weights back under the new score_ckpt",
                key="score_ckpt", value=str(score_ckpt),
                fix="use another folder (hydra.run.dir=...), auto_resume=false to start afresh here (overwriting "
                    f"it), or {allow} to resume it with its own score model")
    # only groups both name: train_dequant's command config leaves sde/model/data to its score checkpoint; the
    # classifier group only train_classifier.py's runs have (another network would not load, or load and differ)
    groups = [g for g in (*IDENTITY_GROUPS, "classifier") if g in cfg and g in stored]
    diff = config_differences(stored, OmegaConf.to_container(OmegaConf.masked_copy(cfg, groups), resolve=True), groups)
    # the seed too: a folder of a sweep's other seed (a job renumbered by values added to the sweep) is another run
    seed = OmegaConf.select(cfg, "seed", default=None)
    if "seed" in stored and seed is not None and stored["seed"] != seed:
        diff.append(f"seed: {stored['seed']} -> {seed}")
    if diff:
        names = "/".join([*IDENTITY_GROUPS, *(["classifier"] if "classifier" in groups else []), "seed"])
        shown = diff[:6] + ([f"... and {len(diff) - 6} more"] if len(diff) > 6 else [])
        raise CheckpointError(
            f"this run folder already holds {ckpt_path}, trained with another {names} "
            "(stored -> requested):\n  " + "\n  ".join(shown), key="auto_resume", value=True,
            fix="use another folder (hydra.run.dir=...), auto_resume=false to start afresh here (overwriting it), "
                f"or {allow}")


def rerun_hint(out: Path) -> str:
    """The override that puts a rerun in the same directory (printed in the pre-emption message)."""
    hc = hydra_config()
    if hc is None:
        return f"hydra.run.dir={out}"
    if hc.mode == RunMode.MULTIRUN:
        return f"hydra.sweep.dir={hc.sweep.dir}"
    return f"hydra.run.dir={hc.run.dir}"


def _read_or_create_json(path: Path, content: dict[str, Any]) -> dict[str, Any]:
    """Create ``path`` with ``content`` unless it exists (atomically: several ranks may race); return its content."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        try:
            os.link(tmp, path)  # fails if another process created it first
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return json.loads(path.read_text())


def with_wandb_resume(loggers: DictConfig | None, out: Path, *, fresh: bool = False) -> DictConfig | None:
    """Give every ``WandbLogger`` in the logger group the run id (and group) stored in ``<out>/wandb_run.json``,
    created on first use, with ``resume="allow"``: a requeued or resumed run appends to the same W&B run.
    ``fresh``: the run starts from no checkpoint (``auto_resume=false`` in a used folder, or nothing to resume), so
    global rank 0 stores a new id: its steps would otherwise go into the old run, whose later steps W&B keeps. An
    ``id`` set in the config wins, and is stored."""
    if not loggers:
        return loggers
    loggers = OmegaConf.create(OmegaConf.to_container(loggers, resolve=True))  # detached: resolve ${...} first
    for name, lg in loggers.items():
        if not lg or not str(lg.get("_target_", "")).endswith("WandbLogger"):
            continue
        path = Path(out) / "wandb_run.json"
        wanted = {"id": lg.get("id") or secrets.token_hex(4), "group": lg.get("group")}
        stored = _read_or_create_json(path, wanted)
        # the other ranks log nothing to W&B: only rank 0 replaces the file (ids drawn per rank would race)
        if stored["id"] != wanted["id"] and (lg.get("id") or (fresh and rank_zero_only.rank == 0)):
            _replace_json(path, wanted)
            stored = wanted
        OmegaConf.update(loggers, name, {"id": stored["id"], "group": stored["group"], "resume": "allow"},
                         force_add=True, merge=True)
    return loggers


def _replace_json(path: Path, content: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(content, f)
    os.replace(tmp, path)
