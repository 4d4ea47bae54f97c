"""What a study's tuning did, for the report: per tuned configuration the values tried with their validation F1 at
the last rung each reached and the one chosen (at an edge of its range or not), and the expected best validation F1
against the number of configurations tried (Dodge et al. 2019)."""

from __future__ import annotations


def expected_max(scores: list[float], trials: int) -> tuple[float, float]:
    """Expected best of ``trials`` configurations drawn (with replacement) from those tried, and its standard
    deviation: Dodge et al., "Show Your Work" (EMNLP 2019), the closed form over the empirical distribution of the
    tried scores (the band they draw is mean +- this SD)."""
    v = sorted(scores)
    n = len(v)
    weights = [(i / n) ** trials - ((i - 1) / n) ** trials for i in range(1, n + 1)]
    mean = sum(x * w for x, w in zip(v, weights))
    second = sum(x * x * w for x, w in zip(v, weights))
    return mean, max(second - mean * mean, 0.0) ** 0.5


def at_edge(values: list, chosen) -> bool:
    """A chosen number at the smallest or largest value tried: the best may lie outside the range."""
    numbers = [x for x in values if isinstance(x, int | float) and not isinstance(x, bool)]
    return len(numbers) == len(values) >= 2 and chosen in (min(numbers), max(numbers))


def summarize(rows: list[dict], chosen: dict[str, dict], failed: dict[str, str] | None = None) -> list[dict]:
    """Per tuned configuration (rows of the store with a ``grp``): the values tried with their validation F1 at the
    last rung each reached, the value chosen (``chosen``: the store's decisions), whether it lies at the edge of
    its range, and why none was chosen (``failed``: no candidate reached a rung). Only validation numbers: a
    candidate's test score is never looked at."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("grp"):
            groups.setdefault(r["grp"], []).append(r)
    out = []
    for grp, members in groups.items():
        points = [{k: v for k, v in r["point"].items() if k != "seed"} for r in members]
        pick = chosen.get(grp)  # its keys are the tuned options, even of a lone candidate
        options = sorted(pick) if pick else sorted(k for k in points[0] if len({repr(p.get(k)) for p in points}) > 1)
        tried = []
        for r, p in zip(members, points):
            scores = [s for s in r.get("scores") or [] if "rung" in s]  # pauses off the rungs (an edit ago) aside
            last = scores[-1] if scores else {}
            tried.append({"value": p[options[0]] if len(options) == 1 else {k: p[k] for k in options},
                          "validation_f1": last.get("f1"), "steps": last.get("step"),
                          "rungs": [{"step": s["step"], "validation_f1": s["f1"]} for s in scores],
                          "stage": r.get("stage")})
        value = None if pick is None else (pick.get(options[0]) if len(options) == 1 else pick)
        out.append({"configuration": grp, "arm": members[0]["arm"],
                    "option": options[0] if len(options) == 1 else options, "tried": tried, "chosen": value,
                    "at_edge": value is not None and len(options) == 1 and at_edge([t["value"] for t in tried], value),
                    "point": {k: v for k, v in points[0].items() if k not in options},
                    "failed": (failed or {}).get(grp)})
    return out


def expected_max_curves(summary: list[dict]) -> list[dict]:
    """Per arm, the expected best validation F1 against the number of configurations tried, every candidate scored
    at one budget: the first rung's step, which all of them reached (scores at later rungs would mix budgets).
    Each curve: ``{"arm", "budget_steps", "curve": [{"trials", "expected_f1", "sd"}]}``."""
    firsts: dict[str, list[dict]] = {}
    for s in summary:
        for t in s["tried"]:
            if t["rungs"]:
                firsts.setdefault(s["arm"], []).append(t["rungs"][0])
    out = []
    for arm, points in firsts.items():
        budget = min(p["step"] for p in points)
        scores = [p["validation_f1"] for p in points if p["step"] == budget and p["validation_f1"] is not None]
        if scores:
            curve = [dict(zip(("expected_f1", "sd"), expected_max(scores, n)), trials=n)
                     for n in range(1, len(scores) + 1)]
            out.append({"arm": arm, "budget_steps": budget, "curve": curve})
    return out


def stable_from(a: list[dict], b: list[dict]) -> int | None:
    """The fewest trials from which arm a's expected best stays on the same side of arm b's (None: never)."""
    n = min(len(a), len(b))
    if not n:
        return None
    signs = [a[k]["expected_f1"] > b[k]["expected_f1"] for k in range(n)]
    k = n - 1
    while k > 0 and signs[k - 1] == signs[-1]:
        k -= 1
    return k + 1
