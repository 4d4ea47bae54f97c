"""Calibration: step keys, offline random-weight models, step timing and wall-time projection."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from qatune.config import TrainConfig
from qatune.model.load import ModelConfigError, ModelError, model_from_config, parameter_counts
from qatune.model.machine import resolve_precision
from qatune.study.calibrate import (
    TYPICAL_PADDED_WIDTH,
    TYPICAL_PADDED_WIDTH_COMPILED,
    StepKey,
    calibrate,
    calibrate_answers,
    makespan,
    project_run_seconds,
    time_answer,
    time_step,
)
from tests.conftest import method_settings, save_tiny_model


@pytest.fixture(scope="module")
def tiny_distilbert(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("calib") / "distilbert", "distilbert"))


def _optimal_makespan(durations: tuple[int, ...], slots: int) -> int:
    """The best makespan over every assignment of runs to workers (exhaustive; small cases only)."""
    best = sum(durations)
    for assignment in itertools.product(range(slots), repeat=len(durations)):
        loads = [0] * slots
        for d, w in zip(durations, assignment):
            loads[w] += d
        best = min(best, max(loads))
    return best


# ---------------------------------------------------------------------------------------------- makespan
def test_makespan_hand_computed():
    assert makespan([5, 1, 2, 7], 1) == 15  # one worker: the sum
    assert makespan([5, 1, 2, 7], 4) == 7  # a worker per run: the longest
    assert makespan([5, 1, 2, 7], 10) == 7
    assert makespan([], 3) == 0
    # LPT places 4 first, then the 1s on the other worker: 4; in list order the 4 lands on a loaded worker: 6
    assert makespan([1, 1, 1, 1, 4], 2) == 4
    assert makespan([1, 1, 1, 1, 4], 2, longest_first=False) == 6  # the driver's study order
    # LPT's classic worst case: 3,3 | 2,2 then the last 2 -> 7, where the optimum {3,3} {2,2,2} is 6
    assert makespan([3, 3, 2, 2, 2], 2) == 7
    assert makespan([3, 7, 4, 6, 5], 2) == 14  # 7|6 -> 7|11 (5) -> 11|11 (4) -> 14|11 (3); input order is moot


def test_makespan_within_lpt_bound_of_optimum():
    # Graham: LPT <= (4/3 - 1/(3m)) x optimum; list order without sorting only guarantees 2 - 1/m
    for n in range(1, 7):
        for durations in itertools.combinations_with_replacement(range(1, 7), n):
            for slots in (1, 2, 3):
                opt = _optimal_makespan(durations, slots)
                got = makespan(list(durations), slots)
                assert opt <= got <= (4 / 3 - 1 / (3 * slots)) * opt + 1e-9
                assert got == makespan(list(reversed(durations)), slots)


def test_makespan_rejects_bad_input():
    with pytest.raises(ValueError):
        makespan([1.0], 0)
    with pytest.raises(ValueError):
        makespan([-1.0], 2)


# ---------------------------------------------------------------------------------------------- projection
def test_project_run_seconds():
    # 5 s setup, 100 steps of 2 s, 300 learning-curve windows at 0.01 s and 50 test windows at 0.04 s
    assert project_run_seconds(100, 2.0, 300, 50, (0.01, 0.04), 5.0) == pytest.approx(5 + 200 + 3 + 2)
    assert project_run_seconds(100, 2.0, 0, 0, (1.0, 1.0), grad_accum=4) == pytest.approx(800)
    assert project_run_seconds(0, 2.0, 0, 0, (1.0, 1.0)) == 0
    with pytest.raises(ValueError):
        project_run_seconds(10, 1.0, 10, 0, (0.1, 0.1), grad_accum=0)
    with pytest.raises(ValueError):
        project_run_seconds(10, 1.0, -1, 0, (0.1, 0.1))


# ---------------------------------------------------------------------------------------------- keys
def test_step_key_normalises_lora_fields_for_full_fine_tuning():
    a = StepKey.from_config(TrainConfig(model="m", strategy="full", lora_rank=32, lora_targets=["q_lin"]))
    b = StepKey.from_config(TrainConfig(model="m", strategy="full", lora_rank=256, lora_dropout=0.0))
    assert a == b and hash(a) == hash(b)
    assert a.method == ()
    lo32 = StepKey.from_config(TrainConfig(model="m", strategy="lora", lora_rank=32))
    lo64 = StepKey.from_config(TrainConfig(model="m", strategy="lora", lora_rank=64))
    assert lo32 != lo64 and lo32 != a
    # what does not change a step's cost does not split keys: alpha, its policy, seed, data volume
    same = StepKey.from_config(TrainConfig(model="m", strategy="lora", lora_rank=32, lora_alpha=64,
                                           alpha_policy="rslora", seed=3, train_questions=0.5))
    assert same == lo32
    targeted = StepKey.from_config(TrainConfig(model="m", strategy="lora", lora_targets=["q_lin", "v_lin"]))
    assert dict(targeted.method)["lora_targets"] == ("q_lin", "v_lin") and targeted != lo32
    assert StepKey.from_config(TrainConfig(model="m", batch_size=8)) != a


def test_step_key_width():
    key = StepKey.from_config(TrainConfig(model="m", max_seq_length=384))
    assert key.width == TYPICAL_PADDED_WIDTH and TYPICAL_PADDED_WIDTH % 8 == 0
    assert StepKey.from_config(TrainConfig(model="m", max_seq_length=128, doc_stride=32)).width == 128
    assert StepKey.from_config(TrainConfig(model="m", pad_to_max_length=True)).width == 384
    assert StepKey.from_config(TrainConfig(model="m", group_by_length=False)).width == 384
    compiled = StepKey.from_config(TrainConfig(model="m", compile=True))
    assert compiled != key and compiled.width == TYPICAL_PADDED_WIDTH_COMPILED > TYPICAL_PADDED_WIDTH


# ---------------------------------------------------------------------------------------------- models
def test_model_from_config_offline_seed_models():
    mobile = model_from_config("google/mobilebert-uncased", meta=True)
    assert parameter_counts(mobile)["total_params"] == 24_582_914
    assert mobile.config.model_type == "mobilebert"
    distil = model_from_config("distilbert-base-uncased", meta=True)
    assert parameter_counts(distil)["total_params"] == 66_364_418  # 66,362,880 encoder + 768x2+2 span head
    lora = model_from_config("distilbert-base-uncased", "lora", method_settings("lora", lora_rank=32), meta=True)
    # 6 layers x (4 x 32(768+768) attention + 2 x 32(768+3072) feed-forward) adapters + the span head
    assert parameter_counts(lora)["trainable_params"] == 6 * (4 * 32 * 1536 + 2 * 32 * 3840) + 1538


def test_model_from_config_local_dir_has_real_weights_and_keeps_rng(tiny_distilbert):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    model = model_from_config(tiny_distilbert)
    assert torch.rand(1) == before  # building the model did not consume the caller's random numbers
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.isfinite(weights).all() and weights.abs().max() > 0


def test_unreadable_model_raises_clear_error(tmp_path):
    with pytest.raises(ModelConfigError, match="local directory") as e:  # a directory without config.json
        model_from_config(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    assert isinstance(e.value, ModelError)  # the CLI reports ModelError as a one-line message
    with pytest.raises(ModelError, match="missing: no such model directory"):  # no such path: no hub lookup
        model_from_config(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------- timing
def _key(model: str, batch_size: int, strategy: str = "full", precision: str = "fp32") -> StepKey:
    return StepKey.from_config(TrainConfig(model=model, strategy=strategy, lora_rank=8, max_seq_length=128,
                                           doc_stride=32, batch_size=batch_size, precision=precision,
                                           pad_to_max_length=True))


def test_time_step_positive_and_grows_with_batch(tiny_distilbert):
    threads = torch.get_num_threads()
    small = time_step(_key(tiny_distilbert, 1), threads=1, steps=3)
    assert torch.get_num_threads() == threads  # restored after the measurement
    big = time_step(_key(tiny_distilbert, 64), threads=1, steps=3)
    assert 0 < small < big


def test_time_answer_is_per_window_and_cheaper_than_a_training_step(tiny_distilbert):
    threads = torch.get_num_threads()
    key = _key(tiny_distilbert, 8)
    answer = time_answer(key, "fp32", threads=1, steps=3, windows=8)
    assert torch.get_num_threads() == threads
    assert 0 < answer < time_step(key, threads=1, steps=3) / 8  # a forward pass of one window, no backward
    assert time_answer(_key(tiny_distilbert, 8, strategy="lora"), "fp32", threads=1, steps=1) > 0


def test_calibrate_answers_times_each_shape_once_at_the_curve_and_test_precisions(tiny_distilbert, monkeypatch):
    import qatune.study.calibrate as cal

    timed = []
    monkeypatch.setattr(cal, "time_answer", lambda key, precision, *a, **kw: timed.append((key, precision)) or
                        {"fp32": 0.5, "bf16": 0.25}[precision])
    fp32 = [_key(tiny_distilbert, b) for b in (2, 2)]
    out = calibrate_answers(fp32, threads=1, progress=False)
    assert len(timed) == 1 and out[fp32[0]] == (0.5, 0.5)  # training and inference at fp32: one measurement
    timed.clear()
    bf16 = _key(tiny_distilbert, 2, precision="bf16")
    out = calibrate_answers([bf16], threads=1, progress=False)
    assert [p for _, p in timed] == ["bf16", "fp32"] and out[bf16] == (0.25, 0.5)  # curves at bf16, the test fp32


def test_time_step_lora_and_bad_precision(tiny_distilbert):
    assert time_step(_key(tiny_distilbert, 2, strategy="lora"), steps=1, warmup=0) > 0
    with pytest.raises(ModelError, match="fp16 needs a CUDA GPU"):
        time_step(_key(tiny_distilbert, 2, precision="fp16"), steps=1)


def test_calibrate_times_each_shape_once(tiny_distilbert, monkeypatch, capsys):
    import qatune.study.calibrate as cal

    timed = []
    monkeypatch.setattr(cal, "time_step", lambda key, *a: timed.append(key) or float(key.batch_size))
    full = [StepKey.from_config(TrainConfig(model=tiny_distilbert, strategy="full", lora_rank=r, batch_size=4,
                                            precision="fp32")) for r in (8, 16)]
    lora = [StepKey.from_config(TrainConfig(model=tiny_distilbert, strategy="lora", lora_rank=r, batch_size=2,
                                            precision="fp32")) for r in (8, 16, 16)]
    out = calibrate(full + lora, threads=1, progress=True)
    assert len(timed) == 3 and set(out) == set(full + lora)
    assert out[full[1]] == 4.0 and out[lora[0]] == 2.0
    assert "[calibrate 3/3]" in capsys.readouterr().err
    # 'auto' and what it resolves to on this device are one shape, timed once at the resolved precision
    timed.clear()
    resolved = resolve_precision("auto", torch.device("cpu"), "distilbert")
    auto = dataclasses.replace(full[0], precision="auto")
    out = calibrate([auto, dataclasses.replace(full[0], precision=resolved)], progress=False)
    assert len(timed) == 1 and timed[0].precision == resolved and len(out) == 2
