"""What every root entry point does around its task: check, report, keep the console quiet.

``python train.py a=b ...`` runs, in order:

1. :func:`preflight` (before ``@hydra.main``, before torch or Lightning is imported): compose the config
   the way Hydra will and run the task's cheap checks (:mod:`scoreflow.tasks.validate`). A bad value, an
   unknown key ("did you mean ...") or a bad path is reported on one screen and exits with code 2 before a
   run folder exists.
2. :func:`run` (inside ``@hydra.main``): the same checks again (step 1 only composes a multirun), the quiet-console
   set-up (:mod:`scoreflow.tasks.console`), the resolved config as a tree, then the task. An anticipated
   error (:func:`scoreflow.tasks.errors.classify`) raised by the task is printed as one screen and written
   to the run's log file; the process exits with its code. Anything else keeps its traceback.

Hydra's own ``run_and_report`` catches every ``Exception`` and prints a traceback, so the exit happens here,
through ``sys.exit``, which Hydra lets through.
"""

from __future__ import annotations

import difflib
import pickle
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from scoreflow.tasks.console import hydra_config
from scoreflow.tasks.errors import ConfigError, UsageError, classify, format_error, from_instantiation, full_error

CONF = Path(__file__).resolve().parents[3] / "conf"


def register_lazy_resolvers() -> None:
    """``${scoreflow_run_subdir:...}`` (run folders of evaluate.py / sample.py) without importing Lightning;
    :mod:`scoreflow.tasks.checkpoint` replaces it with the same function when it is imported."""

    def run_subdir(*args: Any) -> str:
        from scoreflow.tasks.checkpoint import run_subdir as real

        return real(*args)

    if not OmegaConf.has_resolver("scoreflow_run_subdir"):
        OmegaConf.register_new_resolver("scoreflow_run_subdir", run_subdir)


def wandb_group(group: Any) -> Any:
    """``${scoreflow_wandb_group:${sweep_group}}`` (conf/logger/wandb.yaml): the sweep folder in a multirun, none in a
    single run (where ``hydra.sweep.dir`` names a folder that does not exist); an explicit ``sweep_group=`` stays."""
    from hydra.types import RunMode

    hc = hydra_config()
    if hc is None or hc.mode == RunMode.MULTIRUN:  # composed outside a Hydra job, or a sweep's job
        return group
    return None if str(group) == str(hc.sweep.dir) else group


def sweep_group() -> str | None:
    """``${scoreflow_sweep_group:}`` (``sweep_group``): the sweep folder in a multirun, ``None`` otherwise (a single
    run's config named a ``hydra.sweep.dir`` that does not exist)."""
    from hydra.types import RunMode

    hc = hydra_config()
    return str(hc.sweep.dir) if hc is not None and hc.mode == RunMode.MULTIRUN else None


def run_name() -> str | None:
    """``${scoreflow_run_name:}`` (``run_name``, the W&B run's name): the command's overrides, the swept values of a
    sweep's job included, without ``logger=`` and ``hydra.*``; the run folder's name (its date) when none is left.
    The folder names leave out ``trainer.max_steps``, ``ckpt_path``, ``trainer.devices`` (a rerun with more steps
    resumes in the same folder), so names made from them were equal across a sweep over ``trainer.max_steps``, and
    every plain run was named ``logger=wandb``."""
    hc = hydra_config()
    if hc is None:  # composed outside a Hydra job
        return None
    skip = ("logger=", "+logger", "~logger", "hydra.", "hydra/", "+hydra", "~hydra")
    parts = [str(o) for o in hc.overrides.task if not str(o).startswith(skip)]
    return ",".join(parts) or Path(str(hc.runtime.output_dir)).name


if not OmegaConf.has_resolver("scoreflow_wandb_group"):  # every training entry point imports this module
    OmegaConf.register_new_resolver("scoreflow_wandb_group", wandb_group)
if not OmegaConf.has_resolver("scoreflow_sweep_group"):
    OmegaConf.register_new_resolver("scoreflow_sweep_group", sweep_group)
if not OmegaConf.has_resolver("scoreflow_run_name"):
    OmegaConf.register_new_resolver("scoreflow_run_name", run_name)


def _report_and_exit(exc: BaseException, command: str, run_dir: str | None = None) -> None:
    text = format_error(exc, command, run_dir)
    sys.stdout.flush()
    print(text, file=sys.stderr, flush=True)
    if run_dir:
        from scoreflow.tasks.console import to_log_file

        to_log_file(text)
    code, _ = classify(exc) or (1, None)
    sys.exit(code)


def interrupted_text(command: str, run_dir: str | None) -> str:
    text = f"[scoreflow] {command}: interrupted"
    if command == "evaluate.py" and run_dir:
        text += f"; the finished batches are kept in {run_dir}; rerun the same command to continue"
    return text


def _interrupted(command: str, run_dir: str | None) -> None:
    """One line on stderr (and in the run's log) and exit 130, the shell's code for SIGINT."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting adds no traceback
    text = interrupted_text(command, run_dir)
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - a broken pipe: the line still goes to stderr
        pass
    print("\n" + text, file=sys.stderr, flush=True)
    if run_dir:
        from scoreflow.tasks.console import to_log_file

        to_log_file(text)
    sys.exit(130)


def preflight(config_name: str, validator: Callable[[DictConfig], None] | None = None,
              argv: list[str] | None = None) -> None:
    """Compose ``config_name`` with the command-line overrides and validate it; on an error print one screen
    and exit. A ``-m`` sweep is composed once per swept value (:func:`sweep_variants`), not validated (its jobs
    may run on other machines, and each validates itself); other Hydra flags (``--cfg``, ``--help``, ...) are left
    to Hydra."""
    args = list(sys.argv[1:] if argv is None else argv)
    multirun = [a for a in args if a in ("-m", "--multirun")]
    if any(a.startswith("-") and a not in multirun for a in args) or full_error():
        return
    command = Path(sys.argv[0]).name
    overrides = [a for a in args if a not in multirun]
    for variant in sweep_variants(overrides) if multirun else [overrides]:
        try:
            cfg = compose(config_name, variant)
        except Exception as e:  # noqa: BLE001 - every composition error is a usage error; see explain_composition
            _report_and_exit(explain_composition(e, config_name, variant), command)
        if multirun:  # composition only: the jobs may run elsewhere (SLURM: GPUs, paths); each job validates itself
            continue
        checks = [validator] if validator is not None else []
        if config_name in RESUMING_TASKS:
            checks.append(lambda c: check_folder_resume(c, overrides))
        checks.append(lambda c: unread_additions(overrides, command))
        if config_name == "sample":  # what the command line sets, which the composed config does not tell
            from scoreflow.tasks.validate import unused_sampler

            checks.append(lambda c: unused_sampler(c, overrides))
        for check in checks:
            try:
                check(cfg)
            except Exception as e:  # noqa: BLE001
                if classify(e) is None:
                    raise
                _report_and_exit(e, command)


def unread_additions(overrides: list[str], command: str = "train.py") -> None:
    """``+key=value`` of a top-level key that no scoreflow command has (``+lr=1e-3``): Hydra adds it, nothing reads
    it, and the run went on without it. Keys of any command's config stay allowed (``+resume_allow_changes=true``,
    which only train.py's config has, is read by the others' resume check too)."""
    known = {p.name for p in CONF.iterdir() if p.is_dir()}  # groups: +debug=fast and the like are Hydra's
    for name in ("train", "evaluate", "sample", "train_dequant", "train_classifier"):
        known |= set(OmegaConf.load(CONF / f"{name}.yaml").keys())
    for o in overrides:
        key = o[1:].split("=", 1)[0] if o.startswith("+") and not o.startswith("++") else ""
        if key and not any(c in key for c in "./@") and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            raise ConfigError(f"+{key}: no scoreflow command has a setting {key!r}; + adds it and nothing reads it",
                              key=key, fix=f"did you mean {' or '.join(close)}?" if close else
                              f"see the settings: python {command} --cfg job")


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """The command lines a ``-m`` sweep's checks compose: every value of each swept key once, the other swept keys at
    their first value (``sde=vp,ve weighting=a,b`` -> 3 compositions, not the 4 jobs: a bad value is found all the
    same). A sweep syntax the parser does not take is left to Hydra (no variant)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else None for o in parsed]
    except Exception:  # noqa: BLE001 - Hydra reports its own syntax errors
        return []
    if any(v is not None and not v for v in values):
        return []
    first = [f"{o.get_key_element()}={v[0]}" if v is not None else o.input_line for o, v in zip(parsed, values)]
    variants = [first]
    for i, (o, v) in enumerate(zip(parsed, values)):
        for value in (v or [])[1:]:
            variants.append([*first[:i], f"{o.get_key_element()}={value}", *first[i + 1:]])
    return variants


RESUMING_TASKS = ("train", "train_dequant", "train_classifier")  # auto_resume from <run dir>/checkpoints/last.ckpt


def check_folder_resume(cfg: DictConfig, args: list[str]) -> None:
    """A rerun in an existing folder (``hydra.run.dir=...``) whose ``last.ckpt`` was trained with another
    sde/model/data/dequantization is refused here, before Hydra writes this command's config into the folder's
    ``.hydra/`` (which would then describe a run that never happened); the run repeats the check
    (:func:`scoreflow.tasks.resume.check_same_run`) for what the preflight does not see (multiruns)."""
    run_dir = next((a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == "hydra.run.dir"), None)
    if not run_dir or cfg.get("ckpt_path") or not cfg.get("auto_resume", True):
        return
    last = Path(run_dir).expanduser() / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return
    from omegaconf.errors import OmegaConfBaseException

    from scoreflow.tasks.resume import check_same_run

    try:
        check_same_run(last, cfg)
    except (OmegaConfBaseException, OSError, RuntimeError, pickle.UnpicklingError):
        return  # a value that resolves only inside the Hydra job, an unreadable file: the run reports it


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def explain_composition(exc: Exception, config_name: str, overrides: list[str]) -> UsageError:
    """A Hydra composition error as a usage error naming the key; for an unknown key, the nearest known ones
    (Hydra's own hint, ``+key=value``, would add a key that nothing reads)."""
    text = "\n".join(str(e) for e in (exc, exc.__cause__) if e is not None)
    m = re.search(r"[Cc]ould not override '([^']+)'", text) or re.search(r"full_key: (\S+)", text)
    typed = re.search(r"(Value '[^']*' of type '[^']*' could not be converted to \w+|Invalid value '[^']*'[^\n]*)",
                      text)
    if typed:  # a value of the wrong type for a field of a typed schema (scoreflow.lit.settings)
        key = re.search(r"full_key: (\S+)", text)
        key = key.group(1) if key else (m.group(1) if m else None)
        bad = [o for o in overrides if key and o.lstrip("+~").split("=", 1)[0] == key]
        value = bad[0].split("=", 1)[1] if bad and "=" in bad[0] else None
        fix = f"see the field's type in scoreflow/lit/settings.py or python {config_name}.py --cfg job"
        return ConfigError(f"{key}: {typed.group(1)}", key=key, value=value, fix=fix)
    if m and ("not in struct" in text or re.search(r"Key '[^']+' not in '", text)):
        key = m.group(1).lstrip("+~")
        bad = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key]
        try:
            known = flat_keys(compose(config_name, [o for o in overrides if o not in bad]))
        except Exception:  # noqa: BLE001 - another override is bad as well: no suggestions then
            known = []
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
        if close:  # only those about as close as the best (methd: method, not also seed and eps)
            ratio = [difflib.SequenceMatcher(None, key, c).ratio() for c in close]
            close = [c for c, r in zip(close, ratio) if r >= ratio[0] - 0.05]
        if not close:  # the right name in another group: trainer.accumulate_grad_batches -> module.optim.<same>
            close = [k for k in known if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:3]
        value = bad[0].split("=", 1)[1] if bad and "=" in bad[0] else None
        known_keys = f"see the known keys: python {config_name}.py --cfg job"
        fix = f"did you mean {' or '.join(close)}?" if close else known_keys
        return ConfigError(f"unknown config key {key!r}", key=key, value=value, fix=fix)
    m = re.search(r"Could not override '([^']+)'\. No match in the defaults list", text)
    if m:  # a group this command does not have: Hydra's hint, +group=option, would add it unread or break the run
        group = m.group(1)
        defaults = OmegaConf.to_container(OmegaConf.load(CONF / f"{config_name}.yaml")).get("defaults") or []
        groups = [k.split()[-1] for d in defaults if isinstance(d, dict) for k in d
                  if "@" not in k and "/" not in k and k.split()[-1] != "hydra"]
        fix = {("train", "sampler"): "the sample grids' sampler is callbacks.samples.sampler (e.g. "
                                     "callbacks.samples.sampler.steps=100); sampler= is sample.py's group",
               ("train_classifier", "debug"): "train_classifier.py has no debug presets: a short run is "
                                              "trainer.max_steps=50"}.get((config_name, group))
        return ConfigError(f"{config_name}.py has no config group {group!r} (its groups: {', '.join(groups)})",
                           key=group, fix=fix or f"drop the {group}=... override")
    m = re.search(r"Could not find '([^'/]+)/([^']*)'", text)
    key = m.group(1) if m else None
    lines = [ln for ln in str(exc).split("Config search path")[0].splitlines() if ln.strip()]
    options = [ln.strip() for ln in lines if ln.startswith(("\t", " "))]
    head = [ln.strip() for ln in lines if not ln.startswith(("\t", " "))][:2]
    if options:  # every option, wrapped (the screen keeps 8 lines of a message): Hydra lists one a line
        import textwrap

        head[-1] = head[-1].rstrip(":") + ":"
        head += textwrap.wrap(", ".join(options), 110, initial_indent="  ", subsequent_indent="  ")
    nested: list[str] = []  # Hydra lists a group's top folder only: experiment=table2/<row> are in a subfolder
    if key and (CONF / key).is_dir():
        for folder in sorted(p for p in (CONF / key).iterdir() if p.is_dir()):
            names = sorted(str(f.relative_to(CONF / key).with_suffix("")) for f in folder.glob("*.yaml"))
            if names:
                nested += names
                head.append(f"  and {folder.name}/<name>: {len(names)} files in conf/{key}/{folder.name}/")
    shown = head
    fix = None
    if key:
        close = difflib.get_close_matches(m.group(2), options + nested, n=3, cutoff=0.6)
        fix = f"did you mean {' or '.join(f'{key}={c}' for c in close)}?" if close else "see the options listed above"
    return ConfigError("\n".join(shown), key=key, fix=fix)


def flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (lists are leaves), without resolving interpolations."""
    out = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            node = cfg._get_node(k)
            name = f"{prefix}{k}"
            out.append(name)
            if isinstance(node, DictConfig):
                out.extend(flat_keys(node, name + "."))
    return out


def run(cfg: DictConfig, command: str, task: Callable[[DictConfig], Any],
        validator: Callable[[DictConfig], None] | None = None) -> Any:
    """Validate, quiet the console, print the config, run ``task(cfg)``; report anticipated errors."""
    from scoreflow.tasks.console import print_config, quiet_console, run_folder

    out = run_folder()
    try:
        if validator is not None:
            validator(cfg)
        quiet_console()
        extras = cfg.get("extras") or {}
        if extras.get("print_config", False):
            print_config(cfg, out)
        return _closing_wandb(task, cfg)
    except KeyboardInterrupt:
        # Ctrl-C outside train.py's own handling (scoreflow.lit.preemption turns a first Ctrl-C during training into
        # a checkpoint and a Preempted exit, a SystemExit that passes through here untouched)
        if full_error():
            raise
        _interrupted(command, out)
    except Exception as e:
        from scoreflow.tasks.console import is_multirun

        e = from_instantiation(e, command) or e  # a value or key a constructor refused: a usage error

        if classify(e) is None and is_multirun() and not full_error():
            # a bug in a sweep's job: its traceback into the job's log, and onto the exception as text, which the
            # launcher prints after its table when the exception crossed a process boundary (frames do not pickle)
            import traceback

            from scoreflow.tasks.console import to_log_file

            text = traceback.format_exc()
            try:
                e.scoreflow_traceback = text
            except AttributeError:  # an exception type without a __dict__
                pass
            to_log_file(text)
        if classify(e) is None or full_error():
            raise
        if is_multirun():  # let the launcher record the failed job and go on with the sweep
            from scoreflow.tasks.console import to_log_file

            text = format_error(e, command, out)
            print(text, file=sys.stderr, flush=True)
            to_log_file(text)
            raise
        _report_and_exit(e, command, out)


def _closing_wandb(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """``task(cfg)``, then this process's W&B run closed with the exit code the process ends with (a task that
    finished its run itself, as ``train.py`` does before its table, leaves none open): each job of an in-process
    sweep gets its own run, and a run stopped by a signal is marked pre-empted with 128 + signal."""
    from scoreflow.lit.wandb_logger import finish_wandb_run

    try:
        result = task(cfg)
    except KeyboardInterrupt:
        finish_wandb_run(130, preempted=True)
        raise
    except SystemExit as e:  # Preempted (128 + signal), or an exit of another kind
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1  # as the interpreter exits
        finish_wandb_run(code, preempted=hasattr(e, "signum"))
        raise
    except BaseException as e:
        finish_wandb_run((classify(e) or (1, None))[0] if isinstance(e, Exception) else 1)
        raise
    finish_wandb_run(0)
    return result
