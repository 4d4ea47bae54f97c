"""One study run in a process of its own (``python -m qatune.study.worker SPEC.json``, or a Ray task).

`train()` assumes it owns its process (accelerate's singletons, global seeds, the peak-memory window), so
a study gives every run a fresh one. The worker trains, and hands back an *outcome* — the run record or
the error — without touching the study's database: the driver alone records it. A lock file in the run
directory makes sure a run directory is only ever trained by one process at a time (a worker orphaned by
a killed driver finishes its checkpoint before the run's next worker may start), and the worker stops
cleanly (checkpoint first) when its driver goes away.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from qatune.record import write_json_atomic
from qatune.rundir import OUTCOME, RunDir


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on ``run_dir/.lock`` (waits for an earlier holder of the same run to exit)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(RunDir(run_dir).lock, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def execute(config: dict, threads: int | None = None) -> dict:
    """Train one run; returns ``{"status": "finished", "record": {...}}``, ``{"status": "interrupted", ...}``
    or ``{"status": "failed", "error": ..., "traceback": ...}``. Never raises for a failed run."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from qatune.config import TrainConfig
    from qatune.errors import Interrupted, Paused
    from qatune.train.recipe import train

    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = TrainConfig.from_dict(config)
        with run_lock(Path(cfg.output_dir)):
            record = train(cfg, progress=False)
        return {"status": "finished", "record": record.to_dict()}
    except Paused as e:  # before Interrupted: a pause is a stop asked for by the driver, with a score
        return {"status": "paused", "step": e.step, "score": e.score, "end": e.end}
    except Interrupted as e:
        return {"status": "interrupted", "error": str(e)}
    except Exception as e:  # noqa: BLE001 - a failed run is data, handed to the driver
        return {"status": "failed", "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=8)}


def _exit_with_parent() -> None:
    """Stop cleanly when the driver dies: SIGTERM on parent death (Linux), and a watchdog elsewhere. Both make
    the same one request (the run saves a checkpoint, then stops): the watchdog sets the stop flag, it sends no
    second signal."""
    from qatune.train.signals import STOP

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch():
        while os.getppid() == parent:
            time.sleep(2)
        STOP.set()

    if os.getppid() != parent:  # died before prctl took effect
        STOP.set()
        return

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    from qatune.train.signals import stop_on_signals

    spec_path = Path((argv or sys.argv[1:])[0])
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    with stop_on_signals(second_stops_at_once=False):
        _exit_with_parent()
        outcome = execute(spec["config"], spec.get("threads"))
    write_json_atomic(Path(spec["config"]["output_dir"]) / OUTCOME, outcome)
    if outcome["status"] == "failed":
        print(outcome["traceback"], file=sys.stderr)
    return {"finished": 0, "paused": 0, "interrupted": 130}.get(outcome["status"], 1)


if __name__ == "__main__":
    sys.exit(main())
