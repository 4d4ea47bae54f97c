"""Study driver and launchers: worker processes, claims and leases, retries, kills, Ray."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from qatune.study import store
from qatune.study.driver import run_study
from qatune.study.studyfile import load_study
from tests.runs import db_rows
from tests.test_study import write_study

# Four runs: full fine-tuning and LoRA r=2, each at two data volumes.
NARROW = ["--set", "alpha_policy=['fixed']", "--set", "lora_rank=[2]"]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("m") / "distilbert", "distilbert", dropout=0.0)


def full_only(path):
    """The study with its full fine-tuning arm only (one run at train_questions=[12] and the NARROW grid)."""
    text = path.read_text()
    start = text.index('[[arms]]\nname = "lora"')
    path.write_text(text[:start] + text[text.index("[grid]"):])
    return path


def study_cmd(path, directory, *extra):
    return [sys.executable, "-m", "qatune.cli", "study", str(path), "--dir", str(directory), *NARROW, *extra]


def run_json(directory, rid) -> dict:
    return json.loads((directory / "runs" / rid / "run.json").read_text())


def wait_for(predicate, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------------------------- the store
class _Run:
    def __init__(self, rid):
        from qatune.config import TrainConfig

        self.id, self.arm, self.point = rid, "a", {}
        self.config = TrainConfig(output_dir=f"/tmp/{rid}")


def test_claims_are_exclusive_leases_expire_and_attempts_are_bounded(tmp_path):
    db = store.connect(tmp_path)
    store.register(db, [_Run("r1"), _Run("r2")])
    a, b = store.Owner.new(), store.Owner("otherhost", 1, "x")
    assert store.claim(db, ["r1", "r2"], a, 60, 2, "w0") == "r1"  # study order
    assert store.claim(db, ["r1", "r2"], b, 60, 2, "w0") == "r2"  # r1 is held: the next one
    assert store.claim(db, ["r1", "r2"], a, 60, 2, "w1") is None  # nothing left to claim
    # b's lease expires (its driver on another host stopped renewing): a takes r2 over, a second attempt
    db.execute("UPDATE runs SET lease_until=? WHERE id='r2'", (time.time() - 1,))
    assert store.claim(db, ["r1", "r2"], a, 60, 2, "w1") == "r2"
    row = db_rows(tmp_path)["r2"]
    assert row["attempts"] == 2 and row["owner"] == str(a) and "stopped renewing its lease" in row["error"]
    # b can no longer record anything for r2
    store.finish(db, "r2", b, {"f1": 1.0}, {})
    assert db_rows(tmp_path)["r2"]["status"] == "running"
    # a failed attempt with attempts left goes back to pending; at the bound it is failed, with its error
    assert not store.fail(db, "r1", a, "boom 1", max_attempts=2)
    assert db_rows(tmp_path)["r1"]["status"] == "pending"
    assert store.claim(db, ["r1"], a, 60, 2, "w0") == "r1"
    assert store.fail(db, "r1", a, "boom 2", max_attempts=2)
    assert db_rows(tmp_path)["r1"]["status"] == "failed" and db_rows(tmp_path)["r1"]["error"] == "boom 2"
    assert store.claim(db, ["r1"], a, 60, 2, "w0") is None  # failed runs stay failed ...
    assert store.retry_failed(db, ["r1"]) == 1  # ... until retried explicitly, with a fresh budget
    assert store.claim(db, ["r1"], a, 60, 2, "w0") == "r1" and db_rows(tmp_path)["r1"]["attempts"] == 1
    store.release(db, "r1", a)  # a clean stop does not use up an attempt
    assert db_rows(tmp_path)["r1"]["status"] == "pending" and db_rows(tmp_path)["r1"]["attempts"] == 0


def test_a_dead_local_owner_is_taken_over_at_once(tmp_path):
    db = store.connect(tmp_path)
    store.register(db, [_Run("r1")])
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = store.Owner(store.Owner.new().host, proc.pid, "dead")
    assert store.claim(db, ["r1"], dead, 3600, 3, "w0") == "r1"
    me = store.Owner.new()
    assert store.claim(db, ["r1"], me, 60, 3, "w0") == "r1"  # the lease is long, but its owner is gone
    assert "is no longer running" in db_rows(tmp_path)["r1"]["error"]


# ---------------------------------------------------------------------------------------------- drivers
@pytest.mark.slow
def test_two_drivers_train_every_run_exactly_once(tmp_path, tiny_model, train_file):
    path = write_study(tmp_path, tiny_model, train_file)
    directory = tmp_path / "s"
    cmd = study_cmd(path, directory, "--workers", "1", "--threads", "1")
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    errors = {rid: r["error"] for rid, r in db_rows(directory).items() if r["error"]}
    assert [p.returncode for p in procs] == [0, 0], (errors, [out[-2500:] for out in outs])
    rows = db_rows(directory)
    assert len(rows) == 4
    assert all(r["status"] == "finished" and r["attempts"] == 1 for r in rows.values()), rows
    for rid in rows:  # one training each: trained from step 0, never resumed or repeated
        assert run_json(directory, rid)["timing"]["resumed_from_step"] == 0
        assert len(list((directory / "runs" / rid / "model").glob("*.safetensors"))) == 1
    started = [m for out in outs for m in re.findall(r"\] start (\w+):", out)]
    assert sorted(started) == sorted(rows)  # each run was started by exactly one of the two drivers


@pytest.mark.slow
def test_workers_2_match_workers_1(tmp_path, tiny_model, train_file):
    path = write_study(tmp_path, tiny_model, train_file)
    results = {}
    for n in (1, 2):
        directory = tmp_path / f"w{n}"
        proc = subprocess.run(study_cmd(path, directory, "--workers", str(n), "--threads", "1", "--json"),
                              env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1])["finished"] == 4
        results[n] = {rid: run_json(directory, rid) for rid in db_rows(directory)}
    assert results[1].keys() == results[2].keys()
    for rid in results[1]:
        one, two = results[1][rid], results[2][rid]
        # Same thread count per run, so the same kernels: identical metrics and losses (tolerance: exact).
        assert one["metrics"] == two["metrics"], rid
        assert one["loss"]["curve"] == two["loss"]["curve"], rid


@pytest.mark.slow
def test_worker_killed_mid_run_is_claimed_again_and_resumes(tmp_path, tiny_model, train_file):
    path = full_only(write_study(tmp_path, tiny_model, train_file, steps=1500, save_steps=5))
    directory = tmp_path / "s"
    cmd = study_cmd(path, directory, "--set", "train_questions=[12]",
                    "--workers", "1", "--threads", "1")
    driver = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = wait_for(lambda: next(iter(directory.glob("runs/*/checkpoints/checkpoint-*")), None),
                    what="a first checkpoint")
    run_dir = ckpt.parent.parent
    pid = wait_for(lambda: json.loads((run_dir / "progress.json").read_text())["pid"]
                   if (run_dir / "progress.json").exists() else None, what="progress.json")

    def running_status():  # another terminal's view: which run runs where, how far
        proc = subprocess.run(study_cmd(path, directory, "--set", "train_questions=[12]", "--status",
                                        "--json"),
                              env=ENV, capture_output=True, text=True)
        run = json.loads(proc.stdout.strip().splitlines()[-1])["per_run"][0]
        return run if run["status"] == "running" and run["step"] else None

    seen = wait_for(running_status, what="--status to show the run's progress")
    assert seen["total_steps"] == 1500 and "worker 0 (CPU, 1 threads)" in seen["worker"]
    os.kill(pid, signal.SIGKILL)
    out = driver.communicate(timeout=600)[0]
    assert driver.returncode == 0, out
    assert "attempt failed (will retry)" in out and "killed by signal 9" in out
    rows = db_rows(directory)
    killed = rows[run_dir.name]
    assert killed["status"] == "finished" and killed["attempts"] == 2
    assert run_json(directory, run_dir.name)["timing"]["resumed_from_step"] >= 5


def test_a_worker_told_twice_to_stop_saves_one_checkpoint(tmp_path, tiny_model, train_file):
    """The driver's death reaches a worker twice (SIGTERM on parent death, then its watchdog): that is one request
    to stop, so the worker saves its checkpoint and hands the run back; it does not die mid-step."""
    path = full_only(write_study(tmp_path, tiny_model, train_file, steps=1500, save_steps=5000))
    directory = tmp_path / "s"
    cmd = study_cmd(path, directory, "--set", "train_questions=[12]",
                    "--workers", "1", "--threads", "1")
    driver = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    progress = wait_for(lambda: next(iter(directory.glob("runs/*/progress.json")), None), what="progress")
    run_dir = progress.parent
    pid = wait_for(lambda: json.loads(progress.read_text()).get("pid"), what="the worker's pid")
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGTERM)
    out = driver.communicate(timeout=600)[0]
    assert driver.returncode == 0, out
    assert "KeyboardInterrupt" not in (run_dir / "train.log").read_text()
    assert "attempt failed" not in out  # handed back, not lost
    record = run_json(directory, run_dir.name)
    assert 0 < record["timing"]["resumed_from_step"] < 1500  # the rerun continued from the stop's checkpoint
    assert db_rows(directory)[run_dir.name]["attempts"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, and what timeout/systemd/schedulers send
def test_ctrl_c_stops_cleanly_and_the_rerun_continues(tmp_path, tiny_model, train_file, sig):
    from qatune.rundir import RunDir

    path = full_only(write_study(tmp_path, tiny_model, train_file, steps=3000, save_steps=10000))
    directory = tmp_path / "s"
    cmd = study_cmd(path, directory, "--set", "train_questions=[12]",
                    "--workers", "1", "--threads", "1")
    driver = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    progress = wait_for(lambda: next(iter(directory.glob("runs/*/progress.json")), None), what="progress")
    # the signal goes once the run reports steps trained (the first report is written before step 1), with most of
    # its 3000 steps still to go: a state the run reports, not a time that a loaded machine may overrun
    wait_for(lambda: 1 <= (RunDir(progress.parent).read_progress().get("step") or 0) < 1500, what="a step reported")
    driver.send_signal(sig)
    out = driver.communicate(timeout=300)[0]
    assert driver.returncode == 130, out
    assert "stopping 1 run(s): each saves a checkpoint first" in out
    row = db_rows(directory)[progress.parent.name]
    assert row["status"] == "pending" and row["attempts"] == 0  # handed back; the stop used no attempt
    saved = [int(p.name.split("-")[1]) for p in progress.parent.glob("checkpoints/checkpoint-*")]
    assert saved and 0 < saved[0] < 3000  # a checkpoint at the step it stopped, not a periodic one
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert run_json(directory, progress.parent.name)["timing"]["resumed_from_step"] == saved[0]


@pytest.mark.slow
def test_ray_launcher_matches_local(tmp_path, tiny_model, train_file):
    pytest.importorskip("ray")
    import ray

    from qatune.study.launch import LocalLauncher, RayLauncher

    path = write_study(tmp_path, tiny_model, train_file)
    narrow = ["alpha_policy=['fixed']", "lora_rank=[2]"]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": ""}})
    try:
        study = load_study(path, narrow, directory=tmp_path / "ray")
        counts = run_study(study, RayLauncher(threads=1), poll_s=0.2, progress=False)
    finally:
        ray.shutdown()
    assert counts == {"finished": 4}
    local = load_study(path, narrow, directory=tmp_path / "local")
    assert run_study(local, LocalLauncher(workers=2, threads=1), poll_s=0.2, progress=False) == {"finished": 4}
    rows = db_rows(tmp_path / "ray")
    assert all(r["attempts"] == 1 for r in rows.values())
    for rid in rows:
        a, b = run_json(tmp_path / "ray", rid), run_json(tmp_path / "local", rid)
        assert a["metrics"] == b["metrics"] and a["loss"]["curve"] == b["loss"]["curve"]


# ---------------------------------------------------------------------------------------------- bad usage
@pytest.mark.parametrize("extra,message", [
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--threads", "-1"], "--threads must be >= 1, got -1"),
    (["--runs-per-gpu", "0"], "--runs-per-gpu must be >= 1, got 0"),
    (["--max-attempts", "0"], "--max-attempts must be >= 1, got 0"),
    (["--dry-run", "--calibrate", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["--calibrate"], "--calibrate only goes with --dry-run"),
    (["--dry-run", "--status"], "choose one of --dry-run, --status and --rebuild-db"),
    (["--ray-address", "127.0.0.1:1"], "--ray-address needs --launcher ray"),
    (["--launcher", "ray", "--ray-address", "127.0.0.1:1"], "no Ray cluster answers at '127.0.0.1:1'"),
])
def test_bad_launcher_options_are_refused_before_anything_starts(tmp_path, train_file, extra, message, capsys):
    from qatune.cli import main

    path = write_study(tmp_path, tmp_path / "no-model-needed", train_file)
    assert main(["study", str(path), "--dir", str(tmp_path / "s"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "s" / "study.sqlite").exists()  # nothing was registered or trained


def test_damaged_database_and_status_of_a_study_not_started(tmp_path, train_file, capsys):
    from qatune.cli import main

    path = write_study(tmp_path, tmp_path / "m", train_file)
    assert main(["study", str(path), "--dir", str(tmp_path / "new"), "--status"]) == 0
    assert "10 not started" in capsys.readouterr().out and not (tmp_path / "new").exists()  # a look creates nothing
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "study.sqlite").write_bytes(os.urandom(4096))
    for args in (["study", str(path), "--dir", str(tmp_path / "bad"), "--status"], ["report", str(tmp_path / "bad")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "study.sqlite: not a usable study database" in err and "--rebuild-db" in err


@pytest.mark.slow
def test_a_damaged_run_json_is_finished_again_not_trusted(tmp_path, tiny_model, train_file):
    path = full_only(write_study(tmp_path, tiny_model, train_file))
    narrow = ["alpha_policy=['fixed']", "lora_rank=[2]", "train_questions=[6]"]
    study = load_study(path, narrow, directory=tmp_path / "s")
    assert run_study(study, poll_s=0.1, progress=False) == {"finished": 1}
    run_file = tmp_path / "s" / "runs" / study.runs[0].id / "run.json"
    good = json.loads(run_file.read_text())
    run_file.write_text('{"config": ')
    (tmp_path / "s" / "study.sqlite").unlink()  # the database lost too: only the run directory is left
    assert run_study(load_study(path, narrow, directory=tmp_path / "s"), poll_s=0.1, progress=False) == \
        {"finished": 1}
    again = json.loads(run_file.read_text())
    assert again["metrics"] == good["metrics"] and again["timing"]["steps_run"] == 0  # from its last checkpoint
