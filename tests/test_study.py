import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qatune.cli import main
from qatune.report.write import write_report
from qatune.study.driver import run_study
from qatune.study.studyfile import StudyError, load_study
from tests.conftest import owners, save_tiny_model

STUDY = """
[study]
name = "tiny"

[defaults]
train_data = "{data}"
train_articles = "1-3"
eval_data = "{data}"
eval_articles = "4"
max_seq_length = 96
doc_stride = 32
batch_size = 4
precision = "fp32"
save_steps = {save_steps}
max_steps = {steps}

[[arms]]
name = "full"
model = "{model}"
strategy = "full"
learning_rate = 1e-3

[[arms]]
name = "lora"
model = "{model}"
strategy = "lora"
learning_rate = 1e-3

[grid]
lora_rank = [2, 4]
alpha_policy = ["fixed", "rslora"]
train_questions = [6, 12]
seed = [1]
"""


def write_study(tmp_path, model, data, steps=4, save_steps=2):
    path = tmp_path / "tiny.toml"
    path.write_text(STUDY.format(data=data, model=model, steps=steps, save_steps=save_steps))
    return path


@pytest.fixture(scope="module")
def tiny_distilbert(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "distilbert", "distilbert")


def test_expansion_ids_and_overrides(tmp_path, tiny_distilbert, train_file):
    study = load_study(write_study(tmp_path, tiny_distilbert, train_file), directory=tmp_path / "s")
    # full: 2 volumes x 1 seed; lora: 2 ranks x 2 policies x 2 volumes
    assert len(study.runs) == 2 + 8
    assert len({r.id for r in study.runs}) == len(study.runs)
    full = [r for r in study.runs if r.arm == "full"]
    assert all("lora_rank" not in r.point for r in full)
    again = load_study(write_study(tmp_path, tiny_distilbert, train_file), directory=tmp_path / "s")
    assert [r.id for r in again.runs] == [r.id for r in study.runs]  # ids are stable
    moved = load_study(tmp_path / "tiny.toml", ["eval_questions=3", "lora.learning_rate=2e-3"],
                       directory=tmp_path / "s")
    assert all(r.config.eval_questions == 3 for r in moved.runs)
    assert {r.config.learning_rate for r in moved.runs if r.arm == "lora"} == {2e-3}
    assert {r.config.learning_rate for r in moved.runs if r.arm == "full"} == {1e-3}
    assert not set(r.id for r in moved.runs) & set(r.id for r in study.runs)  # a changed setting is a new run
    with pytest.raises(StudyError, match="no arm named 'nope'"):
        load_study(tmp_path / "tiny.toml", ["nope.seed=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text(STUDY.format(data=train_file, model=tiny_distilbert, steps=2, save_steps=2)
                   .replace("doc_stride = 32", "doc_strid = 32"))
    with pytest.raises(StudyError, match=r"\[defaults\] has unknown option\(s\) \['doc_strid'\]"):
        load_study(bad)


def test_set_on_a_grid_key_changes_that_arms_grid_and_is_checked(tmp_path, tiny_distilbert, train_file):
    path = write_study(tmp_path, tiny_distilbert, train_file)
    one = load_study(path, ["lora.lora_rank=[4]", "lora.seed=[5]"], directory=tmp_path / "s")
    lora = [r for r in one.runs if r.arm == "lora"]
    assert {r.config.lora_rank for r in lora} == {4} and {r.config.seed for r in lora} == {5}
    assert len(lora) == 4  # 1 rank x 2 policies x 2 volumes x 1 seed
    assert {r.config.seed for r in one.runs if r.arm == "full"} == {1}  # the other arm keeps its grid
    both = load_study(path, ["seed=[2, 3]"], directory=tmp_path / "s")
    assert {r.config.seed for r in both.runs} == {2, 3}
    with pytest.raises(StudyError, match=r"arm 'lora' at .*lora_rank.*0"):
        load_study(path, ["lora.lora_rank=0"])  # the grid value is checked like any other
    for key in ("output_dir=/etc", "lora.resume=false", "feature_cache_dir=/tmp/x", "pause_at=1", "oracle_threshold=true"):
        with pytest.raises(StudyError, match="is not an option of a study run"):
            load_study(path, [key])
    own = tmp_path / "own.toml"
    own.write_text(path.read_text().replace("[defaults]\n", "[defaults]\noutput_dir = \"/etc\"\n"))
    with pytest.raises(StudyError, match=r"\[defaults\] sets output_dir.*--dir"):
        load_study(own)


def test_an_arms_own_grid_table_replaces_or_adds_axes_for_that_arm(tmp_path, tiny_distilbert, train_file):
    path = write_study(tmp_path, tiny_distilbert, train_file)
    text = path.read_text()
    path.write_text(text + "\n[grid.lora]\nlora_rank = [8]\nwarmup_ratio = [0.0, 0.1]\n")
    study = load_study(path, directory=tmp_path / "s")
    lora = [r for r in study.runs if r.arm == "lora"]
    assert {r.config.lora_rank for r in lora} == {8} and {r.config.warmup_ratio for r in lora} == {0.0, 0.1}
    assert len(lora) == 1 * 2 * 2 * 2  # its rank, 2 policies, 2 volumes, and its own axis: 2 warm-ups
    full = [r for r in study.runs if r.arm == "full"]
    assert len(full) == 2 and all("warmup_ratio" not in r.point for r in full)  # the other arm keeps the [grid]
    as_set = load_study(write_study(tmp_path, tiny_distilbert, train_file), ["lora.lora_rank=[8]"],
                        directory=tmp_path / "s")
    path.write_text(text + "\n[grid.lora]\nlora_rank = [8]\n")
    # on an axis of the [grid], the same as --set ARM.key=[...]
    assert [r.id for r in as_set.runs] == [r.id for r in load_study(path, directory=tmp_path / "s").runs]
    for extra, words in [("[grid.nope]\nseed = [1]", "[grid.nope]: no arm named 'nope'"),
                         ("[grid.full]\nlora_rank = [8]", f"[grid.full] lora_rank is an option of {owners('lora_rank')}"),
                         ("[grid.lora]\nseed = [1, 1]", "[grid.lora] seed lists 1 more than once"),
                         ("[grid.lora]\nseed = 1", "[grid.lora] seed must be a non-empty list")]:
        path.write_text(text + "\n" + extra + "\n")
        with pytest.raises(StudyError) as e:
            load_study(path, directory=tmp_path / "s")
        assert words in str(e.value), (words, str(e.value))


def test_a_study_directory_belongs_to_one_study(tmp_path, tiny_distilbert, train_file, capsys):
    path = write_study(tmp_path, tiny_distilbert, train_file, steps=1)
    narrow = ["--set", "lora_rank=[2]", "--set", "alpha_policy=['fixed']", "--set", "train_questions=[6]",
              "--set", "eval_questions=3"]
    assert main(["study", str(path), "--dir", str(tmp_path / "s"), *narrow]) == 0
    other = tmp_path / "other.toml"
    other.write_text(path.read_text().replace('name = "tiny"', 'name = "other"'))
    capsys.readouterr()
    assert main(["study", str(other), "--dir", str(tmp_path / "s"), *narrow]) == 2
    err = capsys.readouterr().err
    assert "holds the study 'tiny'" in err and "not 'other'" in err and "its own --dir" in err
    db = sqlite3.connect(tmp_path / "s" / "study.sqlite")
    assert {row[0] for row in db.execute("SELECT study FROM grids")} == {"tiny"}  # nothing of 'other' recorded
    db.close()


def test_dry_run_lists_costs(tmp_path, tiny_distilbert, train_file, capsys):
    path = write_study(tmp_path, tiny_distilbert, train_file)
    assert main(["study", str(path), "--dir", str(tmp_path / "s"), "--dry-run", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["runs"] == 10
    assert not (tmp_path / "s" / "study.sqlite").exists()  # a dry run trains and records nothing


def test_seed_preset_dry_run_offline(capsys):
    assert main(["study", "studies/seed.toml", "--dry-run", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    # four cells: each model fully fine-tuned (4 volumes) and with LoRA (6 ranks x 3 policies x 4 volumes), each
    # configuration with 3 learning-rate candidates
    assert json.loads(out[-1])["runs"] == 2 * (12 + 216)
    cells = {(line.split()[2], line.split()[4]) for line in out if "rajpurkar" not in line and "-uncased" in line}
    assert cells == {("mobilebert-full", "full"), ("mobilebert-lora", "lora"), ("distilbert-full", "full"),
                     ("distilbert-lora", "lora")}
    row = next(line for line in out if "mobilebert-full" in line and "google/mobilebert-uncased" in line)
    assert "24,582,914" in row  # MobileBERT QA parameters, counted offline from its config
    capped = [line for line in out if "distilbert-lora" in line and " ‡ " in line]
    assert len(capped) == 36 and all("lora_rank=1024" in line for line in capped)  # 3 policies x 4 volumes x 3 rates
    assert any(line.startswith("‡ r=1024 >= min(d_in, d_out) of all adapted layers (narrowest 768)") for line in out)


def test_seed_preset_calibrates_offline(capsys):
    """Random-weight MobileBERT and DistilBERT (8 shapes: each model full and at 3 LoRA ranks) are timed here,
    offline; tiny batches and three ranks keep the test cheap, the shapes' architecture is the real one."""
    narrow = ["--set", "lora_rank=[32, 64, 128]"]
    args = ["study", "studies/seed.toml", "--dry-run", "--calibrate", "--workers", "2", "--json",
            "--set", "batch_size=2", "--set", "max_seq_length=64", "--set", "doc_stride=32", *narrow]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # two models, each full (4 volumes) and LoRA (3 ranks x 3 policies x 4 volumes): 80 configurations, each with
    # 3 learning-rate candidates at the tuning seed, then its chosen value at its 3 seeds, each a fresh final run
    runs = 2 * (12 + 108)
    assert out["runs"] == runs and out["total_pflop"] > 0 and out["slots"] == 2
    per_run = out["per_run"]
    assert len(per_run) == runs + 240 and sum(p["final"] for p in per_run) == 240
    assert all(p["projected_s"] > 0 and p["s_per_step"] > 0 for p in per_run)
    by_shape = {}
    for p, r in zip(per_run, load_study("studies/seed.toml", [narrow[1]]).runs):
        rank = r.config.lora_rank if r.config.strategy == "lora" else 0
        by_shape.setdefault((r.config.model, rank), set()).add(p["s_per_step"])
    assert len(by_shape) == 8 and all(len(v) == 1 for v in by_shape.values())  # one measurement per shape
    # more data, more steps, longer projected runs; the study takes at least its longest run and at most the sum
    assert out["serial_hours"] / 2 <= out["projected_hours"] <= out["serial_hours"]
    assert out["projected_hours"] * 3600 >= max(p["projected_s"] for p in per_run)


def test_run_skip_fail_and_report(tmp_path, tiny_distilbert, train_file, capsys):
    path = write_study(tmp_path, tiny_distilbert, train_file)
    study = load_study(path, ["lora.lora_targets=['no_such_module']"], directory=tmp_path / "s")
    counts = run_study(study, max_attempts=1, poll_s=0.1, progress=False)
    assert counts == {"finished": 2, "failed": 8}  # failures are recorded and the study goes on
    db = sqlite3.connect(tmp_path / "s" / "study.sqlite")
    err = db.execute("SELECT error FROM runs WHERE status='failed'").fetchone()[0]
    assert "no_such_module" in err
    study = load_study(path, directory=tmp_path / "s")
    counts = run_study(study, poll_s=0.1, progress=False)
    assert counts["finished"] == 10
    attempts = dict(db.execute("SELECT id, attempts FROM runs").fetchall())
    assert all(attempts[r.id] == 1 for r in study.runs if r.arm == "full")  # finished runs are skipped
    assert len(list((tmp_path / "s" / "cache").glob("features-*.pkl"))) >= 2  # tokenised once, reused
    assert main(["study", str(path), "--dir", str(tmp_path / "s"), "--status"]) == 0
    assert "finished" in capsys.readouterr().out
    report = write_report(tmp_path / "s")
    text = Path(report["report"]).read_text()
    assert "## Headline table (12 training questions)" in text and "## Other data volumes" in text
    assert "Headline arms `full` − `lora`" in text and "Does LoRA rank matter?" in text
    for fig in ["rank_sweep.png", "data_volume.png", "pareto.png"]:
        assert (tmp_path / "s" / fig).stat().st_size > 1000
        assert f"]({fig})" in text
    # the 8 failed runs of the first (differently configured) study are another grid's: left out unless asked
    assert "Incomplete study" not in text and "8 other row(s)" in text
    assert "Incomplete study" in Path(write_report(tmp_path / "s", all_runs=True)["report"]).read_text()
    assert "One training seed per configuration" in text


def test_report_on_partial_study_says_what_is_missing(tmp_path, tiny_distilbert, train_file):
    path = write_study(tmp_path, tiny_distilbert, train_file)
    study = load_study(path, directory=tmp_path / "s")
    study.runs = study.runs[:1]
    run_study(study, poll_s=0.1, progress=False)
    full = load_study(path, directory=tmp_path / "s")
    from qatune.study.store import connect, register

    register(connect(full.directory), full.runs)
    text = Path(write_report(tmp_path / "s", all_runs=True)["report"]).read_text()
    assert "Incomplete study" in text and text.count(": pending") == 9


def test_sigkill_mid_run_then_resume(tmp_path, tiny_distilbert, train_file):
    """Kill -9 while a run trains; the restart finishes every run exactly once, resuming the killed one."""
    path = write_study(tmp_path, tiny_distilbert, train_file, steps=120, save_steps=5)
    cmd = [sys.executable, "-m", "qatune.cli", "study", str(path), "--dir", str(tmp_path / "s"),
           "--set", "alpha_policy=['fixed']", "--set", "lora_rank=[2]", "--set", "train_questions=[12]"]
    # On the CPU, one thread: slow enough that the kill lands mid-run (a GPU finishes the run first).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_ckpt = None
    deadline = time.time() + 300
    while time.time() < deadline and first_ckpt is None:
        found = list((tmp_path / "s" / "runs").glob("*/checkpoints/checkpoint-*")) if (tmp_path / "s").exists() else []
        first_ckpt = found[0] if found else None
        time.sleep(0.2)
    assert first_ckpt is not None, "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    db = sqlite3.connect(tmp_path / "s" / "study.sqlite")
    statuses = dict(db.execute("SELECT id, status FROM runs").fetchall())
    assert "running" in statuses.values() and "finished" not in statuses.values()
    killed = next(i for i, s in statuses.items() if s == "running")
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    rows = db.execute("SELECT id, status, attempts FROM runs").fetchall()
    assert len(rows) == len(statuses) == 2 and all(s == "finished" for _, s, _ in rows)
    run = json.loads((tmp_path / "s" / "runs" / killed / "run.json").read_text())
    assert run["timing"]["resumed_from_step"] >= 5  # continued from its checkpoint, not from scratch
    others = [i for i in statuses if i != killed]
    assert all(json.loads((tmp_path / "s" / "runs" / i / "run.json").read_text())["timing"]["resumed_from_step"]
               == 0 for i in others)


class _StopsWhileStarting:
    """A launcher whose worker is still starting when the driver is stopped: the stop kills it before it could
    save (as SIGTERM kills a worker that has not installed its handler yet)."""

    name = "stub"

    def __init__(self):
        from qatune.study.launch import Slot

        self.slots, self.running = [Slot(0, None, 1)], []

    def submit(self, run, slot):
        self.running.append(run.id)

    def poll(self):
        if self.running:
            raise KeyboardInterrupt  # Ctrl-C or SIGTERM to the driver, once a run has started
        return []

    @staticmethod
    def shares_device(a, b):
        return False

    def stop(self, grace_s=120.0):
        from qatune.study.launch import Outcome

        out = [Outcome(rid, "died", error="worker process died (killed by signal 15) without an outcome")
               for rid in self.running]
        self.running = []
        return out

    def close(self):
        pass


def test_a_run_stopped_while_its_worker_starts_is_handed_back_without_using_an_attempt(tmp_path, tiny_distilbert,
                                                                                       train_file):
    from qatune.study import store
    from qatune.study.driver import StudyInterrupted

    study = load_study(write_study(tmp_path, tiny_distilbert, train_file), directory=tmp_path / "s")
    with pytest.raises(StudyInterrupted, match=r"1 run\(s\) were running and keep their checkpoints"):
        run_study(study, _StopsWhileStarting(), poll_s=0.01, progress=False)
    db = store.connect(study.directory)
    row = db.execute("SELECT status, attempts, error FROM runs WHERE id=?", (study.runs[0].id,)).fetchone()
    db.close()
    assert tuple(row) == ("pending", 0, None)
