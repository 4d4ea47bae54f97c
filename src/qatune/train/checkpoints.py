"""Checkpoints of a training run: written atomically, read back whole before anything is applied.

``checkpoint-<step>/`` holds the trainable weights (safetensors) and the optimizer, scheduler and RNG states
(``state.pt``) and the configuration they were trained with (``config.json``): with the batch order a pure function of (seed, step), that is all ``--resume`` needs to continue
exactly where a run stopped. A damaged newest checkpoint falls back to the previous intact one.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from qatune.config import TrainConfig
from qatune.errors import TrainingError
from qatune.rundir import STATE, TRAINABLE, write_config


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, keep: int, cfg: TrainConfig,
                    history: dict | None = None) -> Path:
    """Atomically write checkpoint-<step>: trainable weights (safetensors), optimizer/scheduler/RNG state, the
    configuration they were trained with (what --resume checks) and the training record of every attempt up to
    this step (``history``: train_s, process_cpu_s, windows, tokens, loss_curve), so a resumed run's record
    covers all the steps it trained."""
    from safetensors.torch import save_file

    final = ckpt_dir / f"checkpoint-{step}"
    tmp = ckpt_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / TRAINABLE))
    torch.save({
        "step": step,
        "history": history,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }, tmp / STATE)
    write_config(tmp, cfg)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(list_checkpoints(ckpt_dir))[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def load_weights(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy trainable weights (a checkpoint's or the best step's) into ``model``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.glob("checkpoint-*"):
        if (p / STATE).exists() and (p / TRAINABLE).exists():
            out.append((int(p.name.split("-")[1]), p))
    return sorted(out)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Both files of a checkpoint, read completely before anything is applied (raises if either is damaged)."""
    from safetensors.torch import load_file

    weights = load_file(str(path / TRAINABLE))
    state = torch.load(path / STATE, weights_only=False)
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng"} <= set(state):
        raise ValueError("state.pt lacks step/optimizer/scheduler/rng")
    return weights, state


def latest_intact_checkpoint(ckpts: list[tuple[int, Path]]) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that reads back whole; a damaged newer one is reported and skipped (the
    previous one is kept while a new one is written, see ``keep_checkpoints``)."""
    damaged = []
    for _, path in reversed(ckpts):
        try:
            weights, state = read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - torch/safetensors/pickle raise many types for a damaged file
            damaged.append(f"{path.name} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
            continue
        if damaged:
            print(f"{'; '.join(damaged)}: resuming from {path.name}", file=sys.stderr)
        return path, weights, state
    raise TrainingError(f"no intact checkpoint in {ckpts[0][1].parent}: {'; '.join(damaged)}. Delete that "
                        f"folder to train the run from the start")


def apply_checkpoint(path: Path, weights: dict, state: dict, model, optimizer, scheduler) -> int:
    missing = [n for n in weights if n not in dict(model.named_parameters())]
    if missing:
        raise TrainingError(f"{path}: checkpoint does not fit this model (unknown weights {missing[:3]}); "
                            f"was output_dir used for another configuration?")
    load_weights(model, weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])
