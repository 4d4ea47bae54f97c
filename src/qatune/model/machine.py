"""The machine a run or a model runs on: devices, the precision policy, the environment record, memory and load.

Shared by training, inference and calibration, so a precision or a device means the same everywhere.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from qatune.config import PRECISIONS
from qatune.errors import ConfigError, ModelError


# ---------------------------------------------------------------------------------------------- devices
def best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(device: str | torch.device) -> torch.device:
    """A device this machine has, or a ConfigError naming what it has."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, mps)") from e
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available.get(d.type, False) or d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        have = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] + (["mps"] if available["mps"] else [])
        raise ConfigError(f"--device {device!r} is not on this machine; it has: {', '.join(have)}")
    return d


def resolve_precision(requested: str, device: torch.device, model_type: str = "", training: bool = True) -> str:
    """The precision a model runs at on ``device``: ``requested``, checked, or for ``auto`` bf16 where the hardware
    has it. One policy with one difference: training on a CPU with bf16 kernels uses bf16 (autocast, faster), while
    inference on a CPU keeps fp32, so ``qatune evaluate`` reproduces a run's predictions exactly."""
    if requested not in PRECISIONS:
        raise ModelError(f"unknown precision {requested!r}; choose from {PRECISIONS}")
    if requested == "fp16":
        if model_type == "mobilebert":
            raise ModelError("MobileBERT gives NaN losses in fp16 (its activations overflow); "
                             "use --precision bf16 or fp32")
        if training and device.type != "cuda":
            raise ModelError("fp16 needs a CUDA GPU; on the CPU use --precision bf16 or fp32")
        if device.type == "cpu":
            raise ModelError("fp16 needs a GPU; on the CPU use --precision fp32 or bf16")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelError("this GPU has no bf16; use --precision fp32 (or fp16 for non-MobileBERT models)")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if training and cpu_has_bf16() else "fp32"


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    import qatune

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "qatune": qatune.__version__,
        "torch": torch.__version__,
        **{name: _version(name) for name in ("transformers", "peft", "accelerate", "tokenizers", "datasets")},
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
    }


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-RSS window (Linux clear_refs), so each run of a multi-run process reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:  # VmHWM honours clear_refs; ru_maxrss is the whole process's lifetime peak
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    out = {"peak_rss_mb": rss}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ---------------------------------------------------------------------------------------------- machine load
def _busy_cpu_s() -> float | None:
    """Seconds of CPU time the whole machine has spent busy since boot (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """How much CPU the rest of the machine used while this process ran: (machine busy time - this process's
    CPU time) / wall time, in cores. Immediate, unlike the load average's one-minute smoothing."""

    def __init__(self):
        self.t0, self.cpu0, self.busy0 = time.perf_counter(), time.process_time(), _busy_cpu_s()

    def read(self) -> dict:
        wall = time.perf_counter() - self.t0
        cpu = time.process_time() - self.cpu0
        busy = _busy_cpu_s()
        others = None
        if busy is not None and self.busy0 is not None and wall > 0:
            others = max(0.0, (busy - self.busy0 - cpu) / wall)
        return {"process_cpu_s": cpu, "others_cores": others, "cores": os.cpu_count()}
