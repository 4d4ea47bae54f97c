import json

import pytest

from qatune.data.splits import parse_ranges, select_articles, subsample
from qatune.data.squad import SquadDataError, load_squad, nearest_occurrence, write_squad_json
from tests.conftest import make_examples, shared_file


def _write(tmp_path, obj, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return p


def _doc(context="Paris is the capital of France.", question="What is the capital?", answers=None, qid="q1", **qa):
    answers = [{"text": "Paris", "answer_start": 0}] if answers is None else answers
    return {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": context, "qas": [{"id": qid, "question": question, "answers": answers, **qa}]}]}]}


def test_roundtrip_written_file(tmp_path, small_squad):
    data = load_squad(small_squad)
    expected = make_examples()
    assert data.version == "1.1"
    assert [e.id for e in data.examples] == [e.id for e in expected]
    assert data.examples == expected
    assert data.titles == ["Article_0", "Article_1", "Article_2"]
    for ex in data.examples:
        a = ex.answers[0]
        assert ex.context[a.start : a.end] == a.text


def test_v2_unanswerable(tmp_path):
    exs = make_examples(unanswerable=2)
    p = tmp_path / "v2.json"
    write_squad_json(exs, p, version="2.0")
    data = load_squad(p)
    assert data.version == "2.0"
    assert sum(e.is_impossible for e in data.examples) == 2
    assert data.references()[exs[0].id] == []


def test_unicode_context(tmp_path):
    ctx = "Zürich — 東京 and São Paulo: “naïve” café"
    start = ctx.index("São Paulo")
    data = load_squad(_write(tmp_path, _doc(ctx, answers=[{"text": "São Paulo", "answer_start": start}])))
    assert data.examples[0].answers[0].text == "São Paulo"
    assert data.examples[0].context[start:start + 9] == "São Paulo"


def test_not_json(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(SquadDataError, match=r"broken\.json: SQuAD data file is not valid JSON \(line 1"):
        load_squad(p)


def test_not_squad_shaped(tmp_path):
    with pytest.raises(SquadDataError, match="not SQuAD-shaped"):
        load_squad(_write(tmp_path, [1, 2, 3]))


def test_missing_fields_named(tmp_path):
    doc = _doc()
    del doc["data"][0]["paragraphs"][0]["qas"][0]["question"]
    with pytest.raises(SquadDataError, match=r"article 1 \('T'\), paragraph 1, question 'q1': empty or missing 'question'"):
        load_squad(_write(tmp_path, doc))
    doc = _doc()
    del doc["data"][0]["paragraphs"]
    with pytest.raises(SquadDataError, match="missing field 'paragraphs'"):
        load_squad(_write(tmp_path, doc))


def test_empty_context_and_question(tmp_path):
    with pytest.raises(SquadDataError, match="empty or missing 'context'"):
        load_squad(_write(tmp_path, _doc(context="   ")))
    with pytest.raises(SquadDataError, match="empty or missing 'question'"):
        load_squad(_write(tmp_path, _doc(question="")))


def test_duplicate_ids(tmp_path):
    doc = _doc()
    qas = doc["data"][0]["paragraphs"][0]["qas"]
    qas.append(dict(qas[0]))
    with pytest.raises(SquadDataError, match="question 'q1': duplicate id"):
        load_squad(_write(tmp_path, doc))


def test_answer_start_outside_context(tmp_path):
    with pytest.raises(SquadDataError, match="answer_start 500 is outside the context"):
        load_squad(_write(tmp_path, _doc(answers=[{"text": "Paris", "answer_start": 500}])))


def test_answer_text_mismatch_error_and_repair(tmp_path):
    ctx = "The capital is Paris. Paris is in France."
    path = _write(tmp_path, _doc(ctx, answers=[{"text": "Paris", "answer_start": 3}]))
    with pytest.raises(SquadDataError, match=r"(?s)question 'q1', answer 1: text 'Paris' not found at answer_start 3.*nearest occurrence at 15.*--repair-answers"):
        load_squad(path)
    data = load_squad(path, repair=True)
    assert data.repaired == 1
    assert data.examples[0].answers[0].start == 15


def test_repair_cannot_invent_text(tmp_path):
    path = _write(tmp_path, _doc(answers=[{"text": "Berlin", "answer_start": 0}]))
    with pytest.raises(SquadDataError, match="does not occur in the context"):
        load_squad(path, repair=True)


def test_many_errors_reported_together(tmp_path):
    doc = _doc()
    qas = doc["data"][0]["paragraphs"][0]["qas"]
    for i in range(15):
        qas.append({"id": f"bad{i}", "question": "", "answers": []})
    with pytest.raises(SquadDataError, match=r"15 problem\(s\)(.|\n)*and 5 more"):
        load_squad(_write(tmp_path, doc))


def test_missing_file_is_clear_and_says_how_to_get_squad(tmp_path):
    with pytest.raises(SquadDataError, match="no such SQuAD JSON file") as e:
        load_squad(tmp_path / "nope.json")
    assert "rajpurkar/squad" in str(e.value) and "curl -LO https://rajpurkar.github.io/SQuAD-explorer/dataset/" \
        "dev-v1.1.json" in str(e.value)


def test_nearest_occurrence():
    assert nearest_occurrence("ab ab ab", "ab", 4) == 3
    assert nearest_occurrence("ab ab ab", "ab", 0) == 0
    assert nearest_occurrence("xyz", "ab", 1) is None


def test_parse_ranges():
    assert parse_ranges("1-3") == [0, 1, 2]
    assert parse_ranges("1-2, 5") == [0, 1, 4]
    for bad in ["0-3", "3-1", "a-b"]:
        with pytest.raises(SquadDataError):
            parse_ranges(bad)


def test_select_articles(small_squad):
    data = load_squad(small_squad)
    part = select_articles(data, "2-3")
    assert {e.article for e in part.examples} == {1, 2}
    assert len(part) == 8
    with pytest.raises(SquadDataError, match="goes past the last article"):
        select_articles(data, "1-9")


def test_subsample_deterministic_nested_by_count_and_fraction():
    exs = make_examples(n_articles=5, per_article=10)
    a = subsample(exs, 10, seed=3)
    assert len(a) == 10 and a == subsample(exs, 10, seed=3)
    assert a != subsample(exs, 10, seed=4)
    b = subsample(exs, 25, seed=3)
    assert set(e.id for e in a) <= set(e.id for e in b)
    order = [exs.index(e) for e in b]
    assert order == sorted(order)
    assert len(subsample(exs, 0.5, seed=3)) == 25
    assert subsample(exs, None, seed=3) == exs
    with pytest.raises(SquadDataError, match="only 50 are available"):
        subsample(exs, 51, seed=0)
    with pytest.raises(SquadDataError, match="fraction"):
        subsample(exs, 1.5, seed=0)


def test_real_dev_v11_article_split():
    data = load_squad(shared_file("dev-v1.1.json"))
    assert len(data) == 10570 and len(data.titles) == 48
    assert len(select_articles(data, "1-36")) == 8123
    assert len(select_articles(data, "37-48")) == 2447
    assert data.titles[0] == "Super_Bowl_50" and data.titles[-1] == "Force"


def test_real_dev_v20():
    data = load_squad(shared_file("dev-v2.0.json"))
    assert data.version == "2.0"
    assert len(data) == 11873
    assert sum(e.is_impossible for e in data.examples) == 5945
