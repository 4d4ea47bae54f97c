import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qatune.data.features import FeatureError, build_features, collate, label_span
from qatune.data.squad import Answer, QAExample
from tests.conftest import make_examples

WORDS = ["alpha", "beta", "gamma", "delta", "zürich", "東京", "naïve", "x1", "q", "über", "co-op", "well-known",
         "1,000", "(note)", "end.", "café", "rock'n'roll", "Ωmega"]


@st.composite
def example_with_answer(draw):
    words = draw(st.lists(st.sampled_from(WORDS), min_size=3, max_size=120))
    i = draw(st.integers(0, len(words) - 1))
    j = draw(st.integers(i, min(len(words) - 1, i + 5)))
    seps = draw(st.lists(st.sampled_from([" ", "  ", " \n "]), min_size=len(words), max_size=len(words)))
    context, starts = "", []
    for w, sep in zip(words, seps):
        starts.append(len(context))
        context += w + sep
    context = context.rstrip()
    a0 = starts[i]
    a1 = starts[j] + len(words[j])
    return QAExample("h", "T", context, "which words are these?", (Answer(context[a0:a1], a0),))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ex=example_with_answer(), max_len=st.sampled_from([32, 48, 64]), stride=st.sampled_from([0, 4, 8]))
def test_labels_decode_back_to_answer(tokenizer, ex, max_len, stride):
    f = build_features([ex], tokenizer, max_len, stride)
    answer = ex.answers[0]
    n_answer_tokens = len(tokenizer(answer.text, add_special_tokens=False)["input_ids"])
    labelled = 0
    for w in range(len(f)):
        assert len(f.input_ids[w]) <= max_len
        off, s, e = f.offsets[w], f.start_positions[w], f.end_positions[w]
        assert off[0].tolist() == [-1, -1]  # CLS is never context
        if s == 0:
            assert e == 0
            continue
        labelled += 1
        assert s <= e
        assert ex.context[off[s, 0] : off[e, 1]] == answer.text  # word-aligned answers are recovered exactly
    if n_answer_tokens <= stride or len(f) == 1:
        assert labelled >= 1  # windows advance by (room - stride), so any answer of <= stride tokens fits one


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ex=example_with_answer(), stride=st.sampled_from([2, 8]))
def test_windows_cover_context_and_overlap_by_stride(tokenizer, ex, stride):
    f = build_features([ex], tokenizer, 40, stride)
    ctx_tokens = [f.offsets[w][f.offsets[w][:, 0] >= 0] for w in range(len(f))]
    covered = np.zeros(len(ex.context), dtype=bool)
    for off in ctx_tokens:
        for a, b in off:
            covered[a:b] = True
    non_space = np.array([not c.isspace() for c in ex.context])
    assert covered[non_space].all()
    for prev, nxt in zip(ctx_tokens, ctx_tokens[1:]):
        overlap = prev[-stride:]
        assert np.array_equal(overlap, nxt[:stride])


def test_unanswerable_labels_cls(tokenizer):
    exs = make_examples(unanswerable=2)
    f = build_features(exs, tokenizer, 64, 16)
    for w in range(len(f)):
        if exs[f.example_index[w]].is_impossible:
            assert f.start_positions[w] == 0 and f.end_positions[w] == 0


def test_question_too_long_is_a_clear_error(tokenizer):
    ex = make_examples()[0]
    long_q = QAExample("long-q", ex.title, ex.context, "why " * 60, ex.answers)
    with pytest.raises(FeatureError, match=r"question 'long-q' has 60 tokens.*doc_stride=16.*--max-seq-length"):
        build_features([ex, long_q], tokenizer, 64, 16)


def test_bad_stride(tokenizer):
    with pytest.raises(FeatureError, match="doc_stride=384 must be"):
        build_features(make_examples(), tokenizer, 384, 384)


def test_label_span_edges():
    # tokens: CLS q SEP [0,3) [4,7) [8,11) SEP
    off = np.array([[-1, -1], [-1, -1], [-1, -1], [0, 3], [4, 7], [8, 11], [-1, -1]])
    assert label_span(off, 3, 5, 4, 7) == (4, 4)
    assert label_span(off, 3, 5, 0, 11) == (3, 5)
    assert label_span(off, 3, 5, 5, 6) == (4, 4)  # inside one token
    assert label_span(off, 4, 5, 0, 7) == (0, 0)  # starts before this window
    assert label_span(off, 3, 4, 4, 11) == (0, 0)  # ends after it


def test_collate_dynamic_padding(tokenizer):
    f = build_features(make_examples(), tokenizer, 128, 32)
    rows = [0, 3, 5]
    b = collate(f, rows, tokenizer.pad_token_id)
    longest = max(len(f.input_ids[r]) for r in rows)
    assert b["input_ids"].shape[1] % 8 == 0 and longest <= b["input_ids"].shape[1] < longest + 8
    assert b["attention_mask"].sum(1).tolist() == [len(f.input_ids[r]) for r in rows]
    assert b["start_positions"].tolist() == f.start_positions[rows].tolist()
    assert (b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    full = collate(f, rows, tokenizer.pad_token_id, pad_to_max_length=True)
    assert full["input_ids"].shape[1] == 128
    assert "token_type_ids" in b


def test_features_match_plain_tokenizer_call(tokenizer):
    exs = make_examples(filler=30)
    backend = tokenizer.backend_tokenizer
    backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, length=300)
    backend.no_truncation()
    before = (backend.truncation, backend.padding)
    f = build_features(exs, tokenizer, 96, 24)  # calls the Rust backend directly, then restores its settings
    assert (backend.truncation, backend.padding) == before
    backend.no_padding()
    enc = tokenizer([e.question for e in exs], [e.context for e in exs], truncation="only_second", max_length=96,
                    stride=24, return_overflowing_tokens=True)
    assert len(f) == len(enc["input_ids"]) > len(exs)
    assert [x.tolist() for x in f.input_ids] == enc["input_ids"]
    assert [x.tolist() for x in f.token_type_ids] == enc["token_type_ids"]
    assert f.example_index.tolist() == enc["overflow_to_sample_mapping"]


def test_question_without_tokens(tokenizer):
    ctx = "Paris is the capital of France."
    ex = QAExample("zw", "T", ctx, "\u200b", (Answer("Paris", 0),))  # the normaliser drops it: 0 question tokens
    f = build_features([ex], tokenizer, 64, 16)
    s, e = f.start_positions[0], f.end_positions[0]
    assert ctx[f.offsets[0][s, 0] : f.offsets[0][e, 1]] == "Paris"


def test_windows_that_lose_the_end_of_a_context_are_refused(tokenizer, monkeypatch):
    # tokenizers 0.23.1-0.23.2 drop the last overflowing window(s); simulate that and expect a clear error.
    import qatune.data.features as features

    exs = make_examples(n_articles=1, per_article=2, filler=30)
    full = build_features(exs, tokenizer, 64, 16)
    assert np.bincount(full.example_index).min() > 1
    encode = features._encode

    def lossy(*args):
        windows = list(encode(*args))
        last = max(i for i, (e, _) in enumerate(windows) if e == windows[-1][0])
        return windows[:last]

    monkeypatch.setattr(features, "_encode", lossy)
    with pytest.raises(FeatureError, match=r"question 'q0_1'.*huggingface/tokenizers#2091"):
        build_features(exs, tokenizer, 64, 16)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ex=example_with_answer(), max_len=st.integers(32, 96), stride=st.integers(0, 12))
def test_the_window_count_formula_is_the_tokenizers(tokenizer, ex, max_len, stride):
    """`sizes.windows_of`, given a question's real token counts, gives exactly the windows the fast tokenizer
    makes: the dry run and a study's rungs are planned with it."""
    from qatune.study.sizes import windows_of

    context = len(tokenizer(ex.context, add_special_tokens=False)["input_ids"])
    question = len(tokenizer(ex.question, add_special_tokens=False)["input_ids"])
    assert windows_of(context, question, max_len, stride) == len(build_features([ex], tokenizer, max_len, stride))


@pytest.mark.parametrize("window", [(384, 128), (128, 32), (64, 16)])
def test_sizes_estimate_real_squad_windows_without_tokenising(tokenizer, window):
    """From word counts (local data) and from SQuAD's context-length percentiles (hub data, not downloaded), the
    estimate is within 4% of the windows the tokenizer makes on real SQuAD (dev v1.1, all of it: the percentiles are
    of the whole set) at each window setting."""
    from qatune.data.splits import load_split
    from qatune.study.sizes import estimate_windows, windows_per_question
    from tests.conftest import shared_file

    path = str(shared_file("dev-v1.1.json"))
    examples = load_split(path, "validation", None, None, 0, repair=False).examples
    real = len(build_features(examples, tokenizer, *window))
    estimate = estimate_windows(path, "validation", None, None, 0, "eval", *window)
    assert estimate == pytest.approx(real, rel=0.04)
    assert windows_per_question(*window) * len(examples) == pytest.approx(real, rel=0.04)
