"""The package's house rules: imports run one way, and the commands that only read results load no torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qatune.data import write_squad_json
from tests.conftest import make_examples
from tests.test_report import construct

SRC = Path(__file__).resolve().parents[1] / "src" / "qatune"
# (config.json is left out: a Hugging Face model directory has one of its own, which inference and export look for)
RUN_DIR_NAMES = ('"run.json"', '"metrics.json"', '"predictions.json"', '"nbest.json"',
                 '"null_odds.json"', '"progress.json"', '"curve.json"', '"checkpoints"', '".lock"')


def _imports() -> dict[str, set[str]]:
    """Each qatune module (a package such as cli counts as one) -> the qatune modules it imports (at the top or
    inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        module = path.relative_to(SRC).parts[0].removesuffix(".py")
        names = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qatune."):
                names.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "qatune":
                names.update(a.name for a in node.names)
    return {module: names - {module} for module, names in graph.items()}


def test_no_import_cycle():
    """Imports inside functions count too: a deferred import is still a dependency."""
    top = _imports()
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


def test_the_ground_floor_imports_nothing_above_it():
    graph = _imports()
    for ground in ("errors", "record", "stats", "metrics"):
        assert graph[ground] <= {"errors"}, (ground, graph[ground])
    assert "cli" not in set().union(*(v for k, v in graph.items() if k != "cli"))  # cli is the top floor


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
    from qatune.data import load_squad

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


@pytest.mark.parametrize("module", ["qatune.cli", "qatune.config", "qatune.rundir", "qatune.studyfile", "qatune.plan", "qatune.study",
                                    "qatune.report"])
def test_modules_the_driver_and_report_use_import_without_torch(module, tmp_path):
    write_squad_json(make_examples(1, 1), tmp_path / "x.json")
    _no_torch(f"import {module}", tmp_path)
