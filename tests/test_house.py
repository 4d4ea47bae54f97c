"""The package's house rules: imports run one way, and the commands that only read results load no torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qatune.data.squad import write_squad_json
from tests.conftest import make_examples
from tests.test_report import construct

SRC = Path(__file__).resolve().parents[1] / "src" / "qatune"
PACKAGES = {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
# (config.json is left out: a Hugging Face model directory has one of its own, which inference and export look for)
RUN_DIR_NAMES = ('"run.json"', '"metrics.json"', '"predictions.json"', '"nbest.json"',
                 '"null_odds.json"', '"progress.json"', '"curve.json"', '"checkpoints"', '".lock"', '"pauses.json"',
                 '"question_scores.json"', '"trainable.safetensors"', '"state.pt"', '"best-"', '"worker.json"',
                 '"train.log"', '"outcome.json"')


def _imports(level: int = 1) -> dict[str, set[str]]:
    """Each qatune unit -> the units it imports (at the top or inside functions). ``level`` 1: the packages that name
    the pipeline's stages (data, model, train, answer, study, report, cli) and the top-level modules, each one unit;
    2: every module (``report.stats``)."""
    graph: dict[str, set[str]] = {}

    def unit(dotted: str) -> str:
        parts = dotted.split(".")
        return ".".join(parts[:level]) if parts[0] in PACKAGES else parts[0]

    for path in SRC.rglob("*.py"):
        module = unit(".".join(path.relative_to(SRC).with_suffix("").parts))
        names = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qatune."):
                target = node.module.removeprefix("qatune.")
                if target in PACKAGES:  # from qatune.study import store: the module store
                    names.update(unit(f"{target}.{a.name}") for a in node.names)
                else:
                    names.add(unit(target))
            elif isinstance(node, ast.ImportFrom) and node.module == "qatune":
                names.update(unit(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level:
                raise AssertionError(f"{path}: a relative import; write qatune.<...> so the house rules see it")
    return {module: names - {module} for module, names in graph.items()}


@pytest.mark.parametrize("level", [1, 2])
def test_no_import_cycle(level):
    """Imports inside functions (and under TYPE_CHECKING) count too: a deferred import is still a dependency. Level 1:
    between the stages' packages; level 2: between any two modules."""
    top = _imports(level)
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in top.get(m, ()):
            assert state.get(n) != 1, f"import cycle: {' -> '.join(stack + [m, n])}"
            if not state.get(n):
                visit(n, stack + [m])
        state[m] = 2

    for m in top:
        if not state.get(m):
            visit(m, [])


def test_the_stages_are_packages_that_import_one_way():
    """The layout shows the pipeline: the stages' packages, and below them a few shared modules."""
    assert PACKAGES == {"data", "model", "train", "answer", "study", "report", "cli"}
    graph = _imports()
    assert graph["data"] <= {"errors"}  # SQuAD, windows and batches know nothing of models or runs
    assert graph["model"] <= {"errors", "config", "methods", "data"}
    assert "study" not in graph["train"] | graph["answer"] and "report" not in graph["study"]
    assert "cli" not in set().union(*(v for k, v in graph.items() if k != "cli"))  # cli is the top floor


def test_the_ground_floor_imports_nothing_above_it():
    graph = _imports(level=2)
    for ground in ("errors", "record", "methods", "report.stats", "answer.metrics"):
        assert graph[ground] <= {"errors"}, (ground, graph[ground])


def test_no_module_is_longer_than_450_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_run_directory_file_names_live_in_rundir_only():
    for path in SRC.rglob("*.py"):
        if path.stem == "rundir":
            continue
        text = path.read_text()
        assert not [n for n in RUN_DIR_NAMES if n in text], path.name


def _no_torch(code: str, cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('torch' in sys.modules)"], cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout


def test_score_report_and_study_status_load_no_torch(tmp_path):
    from qatune.data.squad import load_squad

    construct(tmp_path, 'lora_rank = [8, 16]\ntrain_questions = [100]', lambda run, qid: 0.5)
    data = tmp_path / "eval-1.1.json"
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({ex.id: "x" for ex in load_squad(data).examples}))
    import sqlite3

    db = sqlite3.connect(tmp_path / "s" / "study.sqlite")  # what a run of this version records: its LoRA widths
    for rid, costs in db.execute("SELECT id, costs FROM runs").fetchall():
        widths = {"lora_min_width": 384, "lora_layers": 36, "lora_layers_at_full_rank": 0}
        db.execute("UPDATE runs SET costs = ? WHERE id = ?", (json.dumps(json.loads(costs) | widths), rid))
    db.commit()
    db.close()
    _no_torch(f"from qatune.cli import main\nassert main(['score', '--data', '{data}', '--predictions', '{preds}']) == 0",
              tmp_path)
    _no_torch(f"from qatune.cli import main\nassert main(['study', '{tmp_path / 'study.toml'}', '--dir', "
              f"'{tmp_path / 's'}', '--status']) == 0", tmp_path)
    _no_torch(f"from qatune.cli import main\nassert main(['report', '{tmp_path / 's'}']) == 0", tmp_path)
    assert (tmp_path / "s" / "report.md").exists()


@pytest.mark.parametrize("module", ["qatune.cli", "qatune.config", "qatune.methods", "qatune.rundir",
                                    "qatune.study.studyfile", "qatune.study.plan", "qatune.study.driver",
                                    "qatune.report.write"])
def test_modules_the_driver_and_report_use_import_without_torch(module, tmp_path):
    write_squad_json(make_examples(1, 1), tmp_path / "x.json")
    _no_torch(f"import {module}", tmp_path)


def test_no_module_but_the_registry_compares_a_method_name():
    """What a fine-tuning method does is asked of qatune.methods; a `strategy == "lora"` elsewhere would keep a
    new method from working there."""
    from qatune.methods import NAMES

    def names_in(node) -> set:
        if isinstance(node, ast.Constant) and node.value in NAMES:
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(names_in(e) for e in node.elts))
        return set()

    found = []
    for path in SRC.rglob("*.py"):
        if path.stem == "methods":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(names_in(n) for n in (node.left, *node.comparators)):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not found, found
