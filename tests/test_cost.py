"""Inference cost in a run: measured after evaluation, recorded in run.json, shown in the report."""

import json

from qatune.record import RunRecord
from qatune.report.costtable import COST_HEADER, cost_rows
from qatune.report.figures import cost_figure
from qatune.report.stats import pareto_front
from qatune.train.recipe import train
from tests.conftest import save_tiny_model
from tests.runs import qa_data, tiny_config  # noqa: F401 - fixtures


def test_a_run_measures_and_records_its_inference_cost(tmp_path, qa_data):
    model = save_tiny_model(tmp_path / "base", "distilbert")
    r = train(tiny_config(model, qa_data, tmp_path / "run", inference_cost=True), progress=False)
    c = r.inference
    assert "error" not in c, c
    assert c == RunRecord.load(tmp_path / "run" / "run.json").inference == r.costs()["inference"]
    assert c["questions"] == 12 and c["threads"] >= 1
    assert 0 < c["int8_size_bytes"] < c["merged_size_bytes"]  # int8 weights are smaller
    for which in ("torch", "int8"):
        m = c[which]
        assert 0 < m["p50_ms_1_thread"] <= m["p95_ms_1_thread"] and 0 < m["p50_ms"] <= m["p95_ms"]
        assert m["batched_qps"] > 0
    assert 0 <= c["int8"]["f1"] <= 100 and 0 <= c["int8"]["exact_match"] <= c["int8"]["f1"]
    assert not any(p.name.startswith("qatune-cost-") for p in tmp_path.iterdir())  # exports were temporary
    # the report's section and figure, from the costs a study stores
    row = {"id": "abc", "arm": "tiny", "config": r.config, "metrics": r.metrics, "costs": r.costs()}
    rows = cost_rows([row], lambda run: run["arm"])
    assert "p50 ms (1 thread) fp32 / int8" in COST_HEADER and "int8 MiB" in COST_HEADER
    assert len(rows) == 1 and len(rows[0]) == len(COST_HEADER)
    assert rows[0][1:4] == ["tiny", f"{r.metrics['f1']:.2f}", f"{c['int8']['f1']:.2f}"]
    assert cost_figure([row], tmp_path, lambda run: run["arm"]) == "inference_cost.png"
    assert (tmp_path / "inference_cost.png").stat().st_size > 0


def test_runs_without_measurements_add_nothing(tmp_path):
    row = {"id": "x", "arm": "a", "config": {}, "metrics": {"f1": 1.0}, "costs": {"inference": None}}
    assert cost_rows([row], lambda r: r["arm"]) == []
    assert json.loads(json.dumps(RunRecord.from_dict({"config": {}, "resolved": {}, "seed": 1, "data": {},
                                                      "params": {}, "metrics": {}, "timing": {}, "memory": {},
                                                      "environment": {}}).inference)) == {}


def test_pareto_front():
    costs = [10, 5, 20, 5, 30]
    scores = [80, 70, 85, 60, 84]
    assert pareto_front(costs, scores) == [1, 0, 2]  # 3 and 4 are beaten by cheaper, better points
