import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qatune.answer.decode import decode
from qatune.data.squad import Answer, QAExample

CTX = "aa bb cc dd ee ff"
# window 0: CLS q SEP aa bb cc SEP ; window 1: CLS q SEP cc dd ee ff SEP
OFF = np.array([
    [[-1, -1], [-1, -1], [-1, -1], [0, 2], [3, 5], [6, 8], [-1, -1], [-1, -1]],
    [[-1, -1], [-1, -1], [-1, -1], [6, 8], [9, 11], [12, 14], [15, 17], [-1, -1]],
])
EX = [QAExample("e", "T", CTX, "q?", (Answer("bb", 3),))]


def _logits(peaks, base=-20.0):
    x = np.full((2, 8), base, dtype=np.float32)
    for (w, t), v in peaks.items():
        x[w, t] = v
    return x


def test_best_span_over_windows():
    s = _logits({(0, 4): 3.0, (1, 4): 5.0})
    e = _logits({(0, 5): 3.0, (1, 5): 4.0})
    d = decode(EX, np.array([0, 0]), OFF, s, e)
    assert d.predictions == {"e": "dd ee"}


def test_question_tokens_and_padding_never_chosen():
    s = _logits({(0, 1): 100.0, (0, 7): 100.0, (0, 3): 1.0})
    e = _logits({(0, 1): 100.0, (0, 7): 100.0, (0, 3): 1.0})
    d = decode(EX, np.array([0, 0]), OFF, s, e)
    assert d.predictions["e"] == "aa"


def test_end_before_start_and_max_length_excluded():
    s = _logits({(1, 6): 10.0, (1, 4): 1.0})
    e = _logits({(1, 3): 10.0, (1, 4): 1.0})
    assert decode(EX, np.array([0, 0]), OFF, s, e).predictions["e"] == "dd"
    s = _logits({(1, 3): 10.0})
    e = _logits({(1, 6): 10.0})
    assert decode(EX, np.array([0, 0]), OFF, s, e).predictions["e"] == "cc dd ee ff"
    s = _logits({(1, 3): 10.0, (1, 5): 5.0})
    e = _logits({(1, 6): 10.0, (1, 4): 1.0})
    assert decode(EX, np.array([0, 0]), OFF, s, e, max_answer_length=2).predictions["e"] == "ee ff"


def test_v2_null_threshold():
    s = _logits({(0, 0): 4.0, (1, 0): 6.0, (0, 4): 2.0}, base=0.0)
    e = _logits({(0, 0): 4.0, (1, 0): 6.0, (0, 4): 2.0}, base=0.0)
    # null = min over windows of CLS scores = 8; best span "bb" = 4 -> diff 4
    d = decode(EX, np.array([0, 0]), OFF, s, e, version_2=True)
    assert d.predictions["e"] == "" and d.null_odds["e"] == pytest.approx(4.0)
    d = decode(EX, np.array([0, 0]), OFF, s, e, version_2=True, null_threshold=4.5)
    assert d.predictions["e"] == "bb"
    assert decode(EX, np.array([0, 0]), OFF, s, e).predictions["e"] == "bb"  # v1 ignores the null answer


def test_nbest_sorted_with_probabilities():
    rng = np.random.default_rng(0)
    s, e = rng.normal(size=(2, 8)), rng.normal(size=(2, 8))
    d = decode(EX, np.array([0, 0]), OFF, s, e, nbest_size=5, version_2=True)
    cands = d.nbest["e"]
    assert len(cands) == 5
    scores = [c["score"] for c in cands]
    assert scores == sorted(scores, reverse=True)
    assert sum(c["probability"] for c in cands) == pytest.approx(1.0)
    for c in cands:
        assert c["text"] == (CTX[c["start"] : c["end"]] if c["start"] >= 0 else "")


@pytest.mark.parametrize("better", ["aa", "aa bb"])
def test_float32_ties_resolved_in_float64(better):
    # 1 + 2**-24 rounds to 1.0 in float32: the two spans tie there and only float64 tells them apart.
    tiny = np.float32(2.0**-24)
    s = _logits({(0, 3): 1.0})
    e = _logits({(0, 3): tiny if better == "aa" else 0.0, (0, 4): 0.0 if better == "aa" else tiny})
    assert np.float32(s[0, 3] + e[0, 3]) == np.float32(s[0, 3] + e[0, 4])
    for nbest_size in (0, 5):
        d = decode(EX, np.array([0, 0]), OFF, s, e, nbest_size=nbest_size)
        assert d.predictions["e"] == better
        if nbest_size:
            assert d.nbest["e"][0]["text"] == better and d.nbest["e"][0]["score"] == 1.0 + 2.0**-24


def test_nbest_is_a_mapping_of_lists():
    rng = np.random.default_rng(1)
    s, e = rng.normal(size=(2, 8)), rng.normal(size=(2, 8))
    ex2 = [*EX, QAExample("f", "T", CTX, "q?", ())]
    d = decode(ex2, np.array([0, 1]), OFF, s, e, nbest_size=3)
    assert list(d.nbest) == ["e", "f"] and len(d.nbest) == 2
    full = dict(d.nbest)
    assert full["f"] == d.nbest["f"] and len(full["e"]) == 3
    assert {c["text"] for c in full["f"]} <= {CTX[a:b] for a in range(len(CTX)) for b in range(a, len(CTX) + 1)}
    assert full["f"][0]["text"] == d.predictions["f"]
    assert "missing" not in d.nbest and d.nbest.get("missing") is None


def brute_force(examples, example_index, offsets, start, end, n_best, max_len):
    """Oracle: enumerate every start x end among each window's top-n context tokens."""
    best = {}
    for w in range(len(offsets)):
        ex = examples[example_index[w]]
        ctx = offsets[w, :, 0] >= 0
        s = np.where(ctx, start[w], -np.inf).astype(np.float64)  # scores are exact float64 sums
        e = np.where(ctx, end[w], -np.inf).astype(np.float64)
        top_s = np.argsort(-s, kind="stable")[:n_best]
        top_e = np.argsort(-e, kind="stable")[:n_best]
        for i in top_s:
            for j in top_e:
                if not (ctx[i] and ctx[j]) or j < i or j - i + 1 > max_len:
                    continue
                score = s[i] + e[j]
                if ex.id not in best or score > best[ex.id][0]:
                    best[ex.id] = (score, ex.context[offsets[w, i, 0] : offsets[w, j, 1]])
    return {ex.id: best.get(ex.id, (None, ""))[1] for ex in examples}


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), n_best=st.sampled_from([1, 3, 20]), max_len=st.sampled_from([1, 2, 30]))
def test_matches_brute_force_and_stays_in_context(seed, n_best, max_len):
    rng = np.random.default_rng(seed)
    n_ex, width = int(rng.integers(1, 5)), int(rng.integers(6, 24))
    examples, offs, idx = [], [], []
    for k in range(n_ex):
        words = [f"w{rng.integers(0, 99)}" for _ in range(int(rng.integers(3, 30)))]
        ctx = " ".join(words)
        examples.append(QAExample(f"x{k}", "T", ctx, "q", ()))
        spans, pos = [], 0
        for wd in words:
            spans.append((pos, pos + len(wd)))
            pos += len(wd) + 1
        q = int(rng.integers(1, 4))
        room = width - q - 2
        for lo in range(0, len(spans), max(1, room - 1)):
            off = np.full((width, 2), -1)
            chunk = spans[lo : lo + room]
            off[q + 1 : q + 1 + len(chunk)] = chunk
            offs.append(off)
            idx.append(k)
            if lo + room >= len(spans):
                break
    order = rng.permutation(len(offs)) if seed % 2 else np.arange(len(offs))  # windows need not be grouped
    offsets, idx = np.stack(offs)[order], np.array(idx)[order]
    start = rng.normal(size=(len(offs), width)).astype(np.float32)
    end = rng.normal(size=(len(offs), width)).astype(np.float32)
    expected = brute_force(examples, idx, offsets, start, end, n_best, max_len)
    for nbest_size in (0, 20):
        d = decode(examples, idx, offsets, start, end, n_best=n_best, max_answer_length=max_len, nbest_size=nbest_size)
        assert d.predictions == expected
        for ex in examples:
            assert d.predictions[ex.id] in ex.context
            if nbest_size:
                scores = [c["score"] for c in d.nbest[ex.id]]
                assert scores == sorted(scores, reverse=True) and len(scores) <= nbest_size
                assert [c["text"] for c in d.nbest[ex.id][:1]] == ([expected[ex.id]] if scores else [])
