"""Task modules are leaves over the shared ``scoreflow.tasks`` helpers: no module imports a task module.

A *task* is what a command runs (``train.py`` -> ``scoreflow.tasks.train``, ``python -m scoreflow.tasks.reproduce``,
...); a *helper* is what tasks share (assembly, checkpoints, ``fit``, errors, ...). Following ``cfg`` from one task
to the maths then never passes through another task. The imports are read with ``ast`` (nothing is imported), lazy
imports inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = ROOT / "src" / "scoreflow" / "tasks"
PACKAGE = "scoreflow.tasks"

# every module of scoreflow/tasks/ is one or the other (a new module must be put in one of the two sets)
TASKS = frozenset({"train", "train_dequant", "train_classifier", "evaluate", "sample", "reproduce", "sweep_table"})
HELPERS = frozenset({
    "__init__", "build", "checkpoint", "common", "console", "entry", "errors", "fid", "launchers", "likelihood_eval",
    "plots",  # bpd_plot, drawn by train; its __main__ only redraws a finished run's figure
    "resume", "schema", "validate",
})
# the top-level commands: each may import its own task and these helpers from scoreflow.tasks, nothing else
SCRIPTS = {"train.py": "train", "train_dequant.py": "train_dequant", "train_classifier.py": "train_classifier",
           "evaluate.py": "evaluate", "sample.py": "sample"}
SCRIPT_HELPERS = frozenset({"entry", "validate", "common"})  # common: optimized_metric, what a sweeper minimises


def tasks_imported(path: Path, package: str | None = None) -> set[str]:
    """The ``scoreflow.tasks`` submodules that the file at ``path`` (module of ``package``) imports, by name."""
    found: set[str] = set()

    def add(dotted: str) -> None:
        if dotted.startswith(PACKAGE + "."):
            found.add(dotted[len(PACKAGE) + 1:].split(".", 1)[0])

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                parts = (package or "").split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base == PACKAGE:  # from scoreflow.tasks import validate
                found.update(alias.name for alias in node.names)
            else:
                add(base)
    return found


def test_the_parser_sees_every_import_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import scoreflow.tasks.a\nimport scoreflow.tasks.b as b\nfrom scoreflow.tasks.c import f\n"
        "from scoreflow.tasks import d, e\nfrom . import g\nfrom .h import x\nimport scoreflow.lit.module\n"
        "def lazy():\n    from scoreflow.tasks.i import y\n"
    )
    assert tasks_imported(src, PACKAGE) == set("abcdeghi")


def test_every_tasks_module_is_a_task_or_a_helper():
    modules = {p.stem for p in TASKS_DIR.glob("*.py")}
    assert TASKS <= modules and not TASKS & HELPERS
    assert modules <= TASKS | HELPERS, f"put {sorted(modules - TASKS - HELPERS)} in TASKS or HELPERS of this test"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_task_imports_no_other_task(name):
    other = tasks_imported(TASKS_DIR / f"{name}.py", PACKAGE) & TASKS - {name}
    assert not other, f"scoreflow.tasks.{name} imports the task module(s) {sorted(other)}: move what they share " \
                      "into a helper (common.py, build.py, checkpoint.py)"


def test_no_library_module_imports_a_task():
    """Helpers and the rest of the library (lit, nets, ...) import no task: tasks are the leaves."""
    offenders = {}
    for path in (ROOT / "src" / "scoreflow").rglob("*.py"):
        rel = path.relative_to(ROOT / "src").with_suffix("")
        if rel.parent == Path("scoreflow/tasks") and rel.name in TASKS:
            continue
        hit = tasks_imported(path, ".".join(rel.parts[:-1])) & TASKS  # an __init__'s package is its folder too
        if hit:
            offenders[".".join(rel.parts)] = sorted(hit)
    assert not offenders, f"library modules that import task modules: {offenders}"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_script_imports_its_own_task_and_the_entry_helpers(script):
    allowed = SCRIPT_HELPERS | {SCRIPTS[script]}
    imported = tasks_imported(ROOT / script)
    assert SCRIPTS[script] in imported, f"{script} does not run scoreflow.tasks.{SCRIPTS[script]}"
    assert imported <= allowed, f"{script} imports {sorted(imported - allowed)} from scoreflow.tasks"
