"""Launchers: where a study's runs execute. A launcher starts runs in worker processes and hands back each
run's outcome; it never writes the study's database (the driver in `qatune.study.driver` alone does).
Both satisfy :class:`Launcher`, the protocol the driver uses.

- :class:`LocalLauncher` — N worker processes on this machine. On GPUs the workers are spread over the
  visible devices (``CUDA_VISIBLE_DEVICES`` pinning), ``runs_per_gpu`` of them per device; on a CPU the
  cores are divided between them (threads per worker = cores // N).
- :class:`RayLauncher` — each run is a Ray core task (``num_gpus = 1/runs_per_gpu`` on GPU clusters,
  ``num_cpus = threads`` on CPU clusters, one fresh worker process per run), on a local Ray instance or a
  cluster at ``address``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from qatune.errors import QatuneError
from qatune.record import RunRecord, write_json_atomic
from qatune.rundir import OUTCOME, TRAIN_LOG, WORKER_SPEC


class LaunchError(QatuneError, RuntimeError):
    """A launcher that cannot start (missing extra, no cluster); the message says what to do."""


@dataclass(frozen=True)
class Slot:
    """A place one run executes at a time."""

    index: int
    gpu: str | None  # CUDA device index this worker is pinned to; None on a CPU
    threads: int

    def describe(self) -> str:
        return f"worker {self.index} ({'GPU ' + self.gpu if self.gpu is not None else 'CPU'}, {self.threads} threads)"


@dataclass
class Outcome:
    run_id: str
    status: str  # finished | paused | failed | interrupted | died
    record: RunRecord | None = None
    error: str | None = None
    score: float | None = None  # paused: the validation F1 at its rung
    step: int | None = None
    end: bool = False  # paused at the end of its run (shorter than its rung)

    @classmethod
    def from_dict(cls, run_id: str, d: dict) -> Outcome:
        record = RunRecord.from_dict(d["record"]) if d.get("record") else None
        error = d.get("error")
        if d.get("traceback"):
            error = f"{error}\n{d['traceback']}"
        return cls(run_id, d["status"], record, error, d.get("score"), d.get("step"), bool(d.get("end")))


class Launcher(Protocol):
    """What the driver needs of a launcher: slots to fill, runs started on them, outcomes handed back."""

    name: str
    slots: list[Slot]

    def submit(self, run, slot: Slot) -> None:
        """Start ``run`` (a `qatune.study.studyfile.Run`) on ``slot``; returns at once."""

    def poll(self) -> list[Outcome]:
        """The outcomes of runs that ended since the last call; never blocks."""

    @staticmethod
    def shares_device(a: Slot, b: Slot) -> bool:
        """Whether runs on these two slots compete for one device (recorded with each run's costs)."""

    def stop(self, grace_s: float = 120.0) -> list[Outcome]:
        """Ask every running run to stop (each saves a checkpoint when it can) and return their outcomes."""

    def close(self) -> None:
        """Release what the launcher holds (processes, a Ray instance it started)."""


def check_settings(workers: int | None, runs_per_gpu: int, threads: int | None) -> None:
    """Launcher settings checked before anything starts; the message names the option and its range."""
    for flag, value in (("--workers", workers), ("--runs-per-gpu", runs_per_gpu), ("--threads", threads)):
        if value is not None and value < 1:
            raise LaunchError(f"{flag} must be >= 1, got {value}")


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as indices for CUDA_VISIBLE_DEVICES."""
    import torch

    if not torch.cuda.is_available():
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


class LocalLauncher:
    """Worker processes on this machine, one fresh process per run (``python -m qatune.study.worker``)."""

    name = "local"

    def __init__(self, workers: int | None = None, runs_per_gpu: int = 1, threads: int | None = None):
        check_settings(workers, runs_per_gpu, threads)
        gpus = visible_gpus()
        n = workers or (len(gpus) * runs_per_gpu if gpus else 1)
        t = threads or max(1, (os.cpu_count() or 1) // n)
        self.slots = [Slot(i, gpus[i % len(gpus)] if gpus else None, t) for i in range(n)]
        self._procs: dict[str, tuple[subprocess.Popen, Path, object]] = {}

    def submit(self, run, slot: Slot) -> None:
        run_dir = Path(run.config.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / OUTCOME).unlink(missing_ok=True)
        spec = run_dir / WORKER_SPEC
        write_json_atomic(spec, {"config": asdict(run.config), "threads": slot.threads})
        env = {**os.environ, "OMP_NUM_THREADS": str(slot.threads), "MKL_NUM_THREADS": str(slot.threads),
               "TOKENIZERS_PARALLELISM": "false"}
        if slot.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.gpu
        log = open(run_dir / TRAIN_LOG, "ab")  # noqa: SIM115 - closed when the worker is collected
        # Own session: a Ctrl-C in the terminal reaches the driver only, which stops the workers in order.
        proc = subprocess.Popen([sys.executable, "-m", "qatune.study.worker", str(spec)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs[run.id] = (proc, run_dir, log)

    @staticmethod
    def shares_device(a: Slot, b: Slot) -> bool:
        """Two local workers share a GPU when pinned to the same one, and the CPU when neither has a GPU."""
        return a.gpu == b.gpu

    def poll(self) -> list[Outcome]:
        done = []
        for rid, (proc, run_dir, log) in list(self._procs.items()):
            if proc.poll() is None:
                continue
            log.close()
            del self._procs[rid]
            done.append(self._outcome(rid, proc.returncode, run_dir))
        return done

    @staticmethod
    def _outcome(rid: str, code: int, run_dir: Path) -> Outcome:
        try:
            return Outcome.from_dict(rid, json.loads((run_dir / OUTCOME).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError):
            pass
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        tail = ""
        try:
            tail = (run_dir / TRAIN_LOG).read_text(encoding="utf-8", errors="replace")[-1500:]
        except OSError:
            pass
        return Outcome(rid, "died", error=f"worker process died ({how}) without an outcome; log tail:\n{tail}")

    def stop(self, grace_s: float = 120.0) -> list[Outcome]:
        """Ask every worker to stop (SIGTERM: it saves a checkpoint), wait up to ``grace_s``, then kill."""
        for proc, _, _ in self._procs.values():
            with _quiet():
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + grace_s
        while self._procs and time.time() < deadline and any(p.poll() is None for p, _, _ in self._procs.values()):
            time.sleep(0.2)
        for proc, _, _ in self._procs.values():
            if proc.poll() is None:
                with _quiet():
                    proc.kill()
                proc.wait()
        return self.poll()

    def close(self) -> None:
        self.stop(grace_s=30.0)


class RayLauncher:
    """Each run a Ray core task with one fresh worker process (``max_calls=1``); retries stay with the driver
    (``--max-attempts``), so a lost task counts as one attempt, like a lost local worker."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, runs_per_gpu: int = 1,
                 threads: int | None = None):
        try:
            import ray
        except ImportError as e:
            raise LaunchError("--launcher ray needs Ray: pip install 'qatune[ray]'") from e
        self._ray = ray
        self._own = not ray.is_initialized()
        if self._own and address:
            _check_reachable(address)
        if self._own:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise LaunchError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {e}") from e
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        t = threads or 1
        if gpus:
            options, capacity = {"num_gpus": 1 / runs_per_gpu, "num_cpus": t}, gpus * runs_per_gpu
        else:
            options, capacity = {"num_cpus": t}, max(1, int(resources.get("CPU", 1)) // t)
        n = min(workers, capacity) if workers else capacity
        self.slots = [Slot(i, "ray" if gpus else None, t) for i in range(n)]
        from qatune.study.worker import execute

        self._task = ray.remote(max_calls=1, max_retries=0, **options)(execute)
        self._refs: dict[str, object] = {}

    @staticmethod
    def shares_device(a: Slot, b: Slot) -> bool:
        """Unknown: Ray places tasks; each run's own machine-load reading covers the CPU."""
        return False

    def submit(self, run, slot: Slot) -> None:
        self._refs[run.id] = self._task.remote(asdict(run.config), slot.threads)

    def poll(self) -> list[Outcome]:
        if not self._refs:
            return []
        ready, _ = self._ray.wait(list(self._refs.values()), num_returns=len(self._refs), timeout=0)
        done = []
        for rid, ref in list(self._refs.items()):
            if ref not in ready:
                continue
            del self._refs[rid]
            try:
                done.append(Outcome.from_dict(rid, self._ray.get(ref)))
            except self._ray.exceptions.RayError as e:
                done.append(Outcome(rid, "died", error=f"Ray task lost: {type(e).__name__}: {e}"))
        return done

    def stop(self, grace_s: float = 120.0) -> list[Outcome]:
        """Cancel the tasks (force: their processes end; each run loses at most one checkpoint interval)."""
        for ref in self._refs.values():
            with _quiet():
                self._ray.cancel(ref, force=True)
        out = [Outcome(rid, "interrupted", error="cancelled") for rid in self._refs]
        self._refs.clear()
        return out

    def close(self) -> None:
        self.stop()
        if self._own:
            self._ray.shutdown()


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a Ray address nothing answers at (Ray itself retries for minutes)."""
    import socket

    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise LaunchError(f"no Ray cluster answers at {address!r} ({e}); start one with `ray start --head` on the "
                          f"head node and pass its address (host:6379), or omit --ray-address for a local instance") from e


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, (ProcessLookupError, OSError, ValueError))


def make_launcher(kind: str, workers: int | None = None, runs_per_gpu: int = 1, threads: int | None = None,
                  address: str | None = None) -> Launcher:
    check_settings(workers, runs_per_gpu, threads)
    if kind == "local":
        if address:
            raise LaunchError("--ray-address needs --launcher ray")
        return LocalLauncher(workers, runs_per_gpu, threads)
    if kind == "ray":
        return RayLauncher(address, workers, runs_per_gpu, threads)
    raise LaunchError(f"unknown launcher {kind!r}; choose local or ray")
