"""Every command line the README shows for an entry point composes and passes that entry point's checks.

The README is a promise: a user who copies ``python sample.py ckpt_path=... sampler=ode sampler.method=rk4`` must
not meet "unknown config key" because a key was renamed since the line was written. Each ``train.py``,
``evaluate.py``, ``sample.py``, ``train_dequant.py`` and ``train_classifier.py`` line of the README (fenced blocks
and inline code) is composed from ``conf/`` as Hydra would compose it, every interpolation resolved, then run
through the same checks the entry point runs before anything is built (:mod:`scoreflow.tasks.validate`). A
multirun line is composed once per value of each swept key. Placeholders (``ckpt_path=...``, ``<run>``, ``seed=S``)
become checkpoints of the right kind shaped as the scripts write them (config and metadata; no weights are
needed before a model is built) and the data folder the README names (``SCOREFLOW_DATA_DIR=/data``).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from scoreflow.tasks import validate
from scoreflow.tasks.entry import register_lazy_resolvers
from tests.integration.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[2]
ENTRIES = {"train.py": "train", "evaluate.py": "evaluate", "sample.py": "sample",
           "train_dequant.py": "train_dequant", "train_classifier.py": "train_classifier"}
_ENTRY = "|".join(re.escape(e) for e in ENTRIES)
CKPT_KEYS = ("ckpt_path", "score_ckpt", "classifier_ckpt")
HYDRA_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd",
                          "--info", "-i")


def readme_commands(text: str) -> list[tuple[int, str]]:
    """``(line, command)`` for every entry-point command of a Markdown text: lines of fenced blocks (with their
    ``\\`` continuations, ``# comments`` cut) and inline code spans."""
    out: list[tuple[int, str]] = []
    cur: list | None = None
    fenced = False
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            continue
        s = line.strip()
        if cur is None and not re.match(rf"^([A-Z_]+=\S+ )*(python3? |torchrun |srun )\S*.*?\b({_ENTRY})\b", s):
            continue
        part = s.rstrip("\\").strip()
        cur = [i, part] if cur is None else [cur[0], f"{cur[1]} {part}"]
        if not s.endswith("\\"):
            out.append((cur[0], cur[1]))
            cur = None
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    for m in re.finditer(rf"`((?:[A-Z_]+=\S+ )*python3? (?:{_ENTRY})\b[^`]*)`", prose):
        out.append((prose[: m.start()].count("\n") + 1, " ".join(m.group(1).split())))
    return out


def split_command(command: str) -> tuple[str, list[str], bool]:
    """``(entry, overrides, multirun)``: Hydra flags other than ``-m`` and launcher prefixes dropped."""
    command = re.sub(r"<[^<>]*>", "X", command.replace("<the same overrides>", ""))
    tokens = shlex.split(command, comments=True)
    at = next(i for i, t in enumerate(tokens) if t in ENTRIES)
    args, overrides = tokens[at + 1:], []
    multirun = "-m" in args or "--multirun" in args
    for i, a in enumerate(args):
        if not a.startswith("-") and not (i and args[i - 1] in HYDRA_FLAGS_WITH_VALUE):
            overrides.append(a)
    return tokens[at], overrides, multirun


def expand(overrides: list[str], multirun: bool) -> list[list[str]]:
    """One override list per swept value (the first value of every other swept key), or the list itself."""
    if not multirun:
        return [overrides]
    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = [(i, [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
              for i, o in enumerate(parsed) if o.is_sweep_override()]
    if not sweeps:
        return [overrides]
    first = {i: values[0] for i, values in sweeps}
    out = []
    for i, values in sweeps:
        for v in values:
            out.append([({**first, i: v}.get(j, o)) for j, o in enumerate(overrides)])
    return out


@pytest.fixture(scope="module")
def readme() -> list[tuple[int, str]]:
    return readme_commands((ROOT / "README.md").read_text())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The layout the README's Table-2 block names: ``/data/cifar10/cifar-10-batches-py``,
    ``/data/imagenet32/train_32x32``."""
    d = tmp_path_factory.mktemp("data")
    (d / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    (d / "imagenet32" / "train_32x32").mkdir(parents=True)
    return d


def fake_checkpoint(path: Path, kind: str, overrides: list[str], run_dir: Path) -> Path:
    if kind == "score_sde":
        torch.save({"model": {}, "ema": {}, "optimizer": {}, "step": 0}, path)
        return path
    cfg = compose_cfg(overrides, run_dir)
    stored = OmegaConf.to_container(OmegaConf.masked_copy(cfg, list(validate.IDENTITY_GROUPS)), resolve=True)
    meta = {"config": stored, "batches_seen": 3} | ({"kind": kind} if kind != "score" else {})
    torch.save({"state_dict": {}, "global_step": 3, "scoreflow": meta}, path)
    return path


def concrete(entry: str, overrides: list[str], tmp: Path) -> list[str]:
    """The README's placeholders replaced: checkpoints of the kind each key takes, ``seed=S`` a seed."""
    out = []
    rest = [o for o in overrides if o.split("=", 1)[0] not in CKPT_KEYS]
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "seed" and value == "S":
            o = "seed=1"
        elif key in CKPT_KEYS:
            name = f"{entry}_{key}"
            if value.endswith(".pth"):
                kind = "score_sde"
            elif key == "classifier_ckpt":
                kind = "classifier"
            else:
                kind = "score"
            # train.py resumes its own run: the checkpoint of the same identity (sde, model, data, dequantization)
            ident = [r for r in rest if not r.startswith("hydra.")] if entry == "train.py" else []
            if "mode=colorize" in overrides:
                ident = ["data=photos"]  # the README: colorization takes RGB data (e.g. data=photos)
            flow_step = [o.rsplit("dequant_", 1)[1] for o in rest if o.startswith("+experiment=table2/dequant_")]
            if flow_step:
                ident = [f"data={flow_step[0]}"]  # Table 2's flow step is for a score model of its data set
            o = f"{key}={fake_checkpoint(tmp / f'{name}.ckpt', kind, ident, tmp / f'{name}_cfg')}"
        out.append(o)
    return out


def test_the_readme_shows_commands_of_every_entry_point(readme):
    entries = {split_command(c)[0] for _, c in readme}
    assert entries == set(ENTRIES), entries
    assert len(readme) > 50  # the extraction found the blocks and the inline spans


def test_readme_command_extraction():
    text = "\n".join([
        "Run `python train.py sde=vp` or `OMP_NUM_THREADS=1 python evaluate.py",
        "ckpt_path=x.ckpt`; not `train.py` alone.",
        "```bash",
        "python sample.py ckpt_path=... mode=latent \\",
        "    num_images=8   # encode",
        "# python train.py commented=out",
        "torchrun --nproc_per_node=8 evaluate.py devices=8",
        "```",
    ])
    got = readme_commands(text)
    assert [c for _, c in got] == ["python sample.py ckpt_path=... mode=latent num_images=8   # encode",
                                   "torchrun --nproc_per_node=8 evaluate.py devices=8",
                                   "python train.py sde=vp", "OMP_NUM_THREADS=1 python evaluate.py ckpt_path=x.ckpt"]
    assert [n for n, _ in got] == [4, 7, 1, 1]
    assert split_command(got[0][1]) == ("sample.py", ["ckpt_path=...", "mode=latent", "num_images=8"], False)
    assert split_command("python train.py --cfg job -m a=<its x> b=1") == ("train.py", ["a=X", "b=1"], True)
    assert expand(["-m", "a=1,2", "b=x", "c=3,4"][1:], True) == [["a=1", "b=x", "c=3"], ["a=2", "b=x", "c=3"],
                                                                 ["a=1", "b=x", "c=3"], ["a=1", "b=x", "c=4"]]
    assert expand(["'i=[0,40]'".strip("'")], True) == [["i=[0,40]"]]  # a list is not a sweep


def test_every_readme_command_composes_and_passes_its_checks(readme, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SCOREFLOW_DATA_DIR", str(data_dir))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the README's GPU commands, checked on a CPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    register_lazy_resolvers()
    failures = []
    n = 0
    for line, command in readme:
        entry, overrides, multirun = split_command(command)
        overrides = [o.replace("/data/cifar10", str(data_dir / "cifar10")) for o in overrides]
        for k, variant in enumerate(expand(overrides, multirun)):
            tmp = tmp_path / f"l{line}_{k}"
            tmp.mkdir()
            try:
                args = concrete(entry, variant, tmp)
                cfg = compose_cfg(args, tmp / "run", ENTRIES[entry])
                OmegaConf.resolve(cfg)  # every interpolation of the composed config resolves
                getattr(validate, ENTRIES[entry])(cfg)
                n += 1
            except Exception as e:  # noqa: BLE001 - collect every failing line, then report them all
                failures.append(f"README line {line}: {command}\n    {' '.join(variant)}\n    "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    assert not failures, f"{len(failures)} README command(s) fail:\n" + "\n".join(failures)
    assert n >= len(readme)


def readme_tool_commands(text: str) -> list[tuple[int, str, list[str]]]:
    """``(line, script, flags)`` for every ``python bench/X.py ...`` and ``python -m scoreflow.X ...`` the README
    shows (fenced or inline): the script and the ``--flags`` it is given."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        for m in re.finditer(r"python3? (bench/\w+\.py|-m scoreflow[\w.]+)([^`#\n]*)", line):
            script = m.group(1).removeprefix("-m ")
            if script.endswith("."):  # prose: "every `python -m scoreflow...` command"
                continue
            out.append((i, script, sorted(set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(2))))))
    return out


HELPS = """
import contextlib, io, json, runpy, sys
out = {}
for script in json.loads(sys.argv[1]):
    buf = io.StringIO()
    sys.argv = [script, "--help"]
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            if script.endswith(".py"):
                sys.path.insert(0, script.rsplit("/", 1)[0])  # as `python bench/x.py` does: its folder first
                runpy.run_path(script, run_name="__main__")
                sys.path.pop(0)
            else:
                runpy.run_module(script, run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
        except Exception as e:  # noqa: BLE001 - reported as the script's help text
            print(f"{type(e).__name__}: {e}")
    out[script] = buf.getvalue()
print(json.dumps(out))
"""


def test_every_readme_tool_command_names_a_script_and_flags_it_has():
    """``python bench/likelihood_speed.py --gpu-model ddpmpp ...``: the script exists and its ``--help`` lists
    every flag the README gives it (every ``--help`` in one interpreter: torch is imported once)."""
    import json
    import subprocess
    import sys

    tools = readme_tool_commands((ROOT / "README.md").read_text())
    assert len({s for _, s, _ in tools}) >= 10
    scripts = sorted({s for _, s, _ in tools})
    for s in scripts:
        if s.endswith(".py"):
            assert (ROOT / s).is_file(), f"README names {s}, which does not exist"
            assert "argparse" in (ROOT / s).read_text(), s  # --help must print, not run the benchmark
    p = subprocess.run([sys.executable, "-c", HELPS, json.dumps(scripts)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    helps = json.loads(p.stdout.strip().splitlines()[-1])
    assert all("usage:" in helps[s] for s in scripts), {s: h[-300:] for s, h in helps.items() if "usage:" not in h}
    bad = [f"README line {i}: {s} {f}" for i, s, flags in tools for f in flags if f not in helps[s]]
    assert not bad, "flags the scripts do not have:\n" + "\n".join(bad)


def test_the_library_snippet_prints_the_numbers_its_comments_show():
    """"The library in 20 lines": the block runs as shown and prints the values written in its comments."""
    import subprocess
    import sys

    text = (ROOT / "README.md").read_text()
    start = text.index("```python\nimport torch\n")
    code = text[start + len("```python\n"): text.index("```", start + 10)]
    promised = [re.findall(r"\d+\.\d{4}", m) for m in re.findall(r"^print\(.*#\s*([\d. ]+)", code, flags=re.M)]
    assert promised == [["0.3913", "0.3897", "0.3913"], ["0.2823"]], promised
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [re.findall(r"tensor\((-?\d+\.\d+)", line) for line in done.stdout.splitlines()]
    assert [[f"{float(v):.4f}" for v in line] for line in printed] == promised, done.stdout
