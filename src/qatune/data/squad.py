"""SQuAD data: load (official JSON or Hugging Face datasets), validate, split by article, subsample.

Everything downstream works on one in-memory type, :class:`QAExample`, whatever the source. Bad input
is refused with a message that names the file, the record and the problem, because a silent mismatch
between ``answer_start`` and ``text`` turns into wrong labels and a quietly worse model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qatune.errors import FileError, QatuneError, read_json

MAX_REPORTED_ERRORS = 10
GET_SQUAD = ("To get SQuAD: give the datasets id rajpurkar/squad (v1.1) or rajpurkar/squad_v2 (with :train or "
             ":validation), or download the official files: curl -LO "
             "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json (train-v1.1.json, dev-v2.0.json, "
             "train-v2.0.json alike)")

MIN_SEQ_LENGTH = 32  # tokens in a window at least: room for [CLS] question [SEP] some context [SEP]


def kind(value) -> str:
    """How a JSON value is described to the person who sent it ("a string", "a number (5)")."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a number ({value!r:.40})" if isinstance(value, int | float) else type(value).__name__)


def text_problem(record: dict, key: str) -> str | None:
    """What is wrong with ``record[key]`` as a question or context to answer, or None. One rule for every way in
    (JSONL lines, HTTP bodies, flags): present, a string, not blank, and valid Unicode (no lone surrogate, which
    is what a non-UTF-8 byte in a command-line argument or a ``\\ud800`` escape in JSON becomes)."""
    if key not in record:
        return "field required"
    value = record[key]
    if not isinstance(value, str):
        return f"must be a string, got {kind(value)}"
    if not value.strip():
        return "must not be empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"is not valid Unicode text (character {e.start} is a lone surrogate {value[e.start]!r}, e.g. from "
                f"bytes that are not UTF-8); send UTF-8 text")
    return None


class SquadDataError(QatuneError, ValueError):
    """Input that is not usable SQuAD data; the message says where and what to do."""


@dataclass(frozen=True)
class Answer:
    text: str
    start: int  # character offset into the context

    @property
    def end(self) -> int:
        return self.start + len(self.text)


@dataclass(frozen=True)
class QAExample:
    id: str
    title: str
    context: str
    question: str
    answers: tuple[Answer, ...]
    is_impossible: bool = False
    article: int = 0  # 0-based article position in the source, for article splits


@dataclass
class SquadData:
    """Examples of one source plus what was learnt while loading them."""

    examples: list[QAExample]
    version: str  # "1.1" or "2.0"
    source: str
    repaired: int = 0
    titles: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def references(self) -> dict[str, list[str]]:
        """Gold answer texts per question id, as the official metrics want them."""
        return {ex.id: [a.text for a in ex.answers] for ex in self.examples}

    def with_examples(self, examples: list[QAExample]) -> SquadData:
        return SquadData(examples, self.version, self.source, self.repaired, self.titles)


def load_squad(source: str | Path, split: str | None = None, repair: bool = False) -> SquadData:
    """Load SQuAD v1.1/v2.0 from a local official-format JSON file or a datasets hub id.

    ``source`` may be a path to a JSON file, or a datasets id such as ``rajpurkar/squad`` with the split
    given by ``split`` or appended as ``rajpurkar/squad:validation``. ``repair=True`` fixes answers whose
    text is not found at ``answer_start`` by moving them to the nearest occurrence in the context.
    """
    path = Path(source)
    if path.is_file():
        return _load_json(path, repair)
    text = str(source)
    name, named = _named_split(text)
    if named is not None:  # `name:split`: the id's own split wins over ``split`` (as for the split options)
        text, split = name, named
    if path.is_dir() and not (path / "dataset_info.json").exists():
        raise SquadDataError(f"{source}: a directory, not a SQuAD JSON file (nor a saved datasets directory); give "
                             f"the file inside it")
    under_file = next((p for p in path.parents if p.is_file()), None)
    if under_file is not None:
        raise SquadDataError(f"{source}: {under_file} is a file, so nothing can be under it; give the SQuAD JSON "
                             f"file itself")
    if path.name.endswith((".json", ".json.gz")):
        raise SquadDataError(f"{source}: no such SQuAD JSON file (check the path; relative paths start "
                             f"from {Path.cwd()}). {GET_SQUAD}")
    return _load_hf(text, split or "train", repair)


def _named_split(source: str) -> tuple[str, str | None]:
    """``("rajpurkar/squad", "validation")`` for ``rajpurkar/squad:validation``; ``(source, None)`` for a path that
    exists or a source without a split of its own."""
    name, sep, split = source.rpartition(":")
    if not sep or not name or not split or "/" in split or Path(source).exists():
        return source, None
    return name, split


def source_identity(source: str, split: str) -> tuple[str, str | None]:
    """What a data option names, to tell two sources apart as :func:`load_squad` reads them: a JSON file by its
    resolved path (a file is one split), a saved datasets directory by its path and split, a datasets id by its name
    and split (``name:split`` wins over ``split``). Two options with equal identities hold the same articles."""
    path = Path(source)
    if path.is_file() or (not path.exists() and source.endswith((".json", ".gz"))):
        return str(path.resolve()), None
    if path.is_dir():
        return str(path.resolve()), split
    name, named = _named_split(source)
    return name, named or split


def _load_json(path: Path, repair: bool) -> SquadData:
    try:
        raw = read_json(path, "SQuAD data")
    except FileError as e:
        raise SquadDataError(str(e)) from e
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise SquadDataError(
            f"{path}: not SQuAD-shaped: expected an object with a 'data' list of articles "
            '({"version": ..., "data": [{"title": ..., "paragraphs": [...]}]}).'
        )
    records = []
    for a, article in enumerate(raw["data"]):
        where = f"article {a + 1}"
        if not isinstance(article, dict):
            records.append(_Bad(f"{where}: expected an object, got {type(article).__name__}"))
            continue
        title = article.get("title")
        if not isinstance(title, str):
            records.append(_Bad(f"{where}: missing or non-string field 'title'"))
            title = f"article-{a + 1}"
        where = f"article {a + 1} ({title!r})"
        paragraphs = article.get("paragraphs")
        if not isinstance(paragraphs, list):
            records.append(_Bad(f"{where}: missing field 'paragraphs' (a list)"))
            continue
        for p, para in enumerate(paragraphs):
            pwhere = f"{where}, paragraph {p + 1}"
            if not isinstance(para, dict) or not isinstance(para.get("qas"), list):
                records.append(_Bad(f"{pwhere}: missing field 'qas' (a list)"))
                continue
            context = para.get("context")
            for qa in para["qas"]:
                records.append(_Raw(a, title, context, qa, pwhere))
    version = "2.0" if str(raw.get("version", "")).lstrip("v").startswith("2") else "1.1"
    return _build(records, str(path), version, repair)


def _load_hf(name: str, split: str, repair: bool) -> SquadData:
    """Load a datasets id (or saved dataset dir) with SQuAD columns: id, title, context, question, answers."""
    import datasets

    try:
        ds = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name, split=split)
    except Exception as e:  # network, unknown id, unknown split: the library's message plus what we tried
        raise SquadDataError(
            f"{name} (split {split!r}): could not load as a local JSON file or a datasets id: {e}"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    missing = {"id", "context", "question", "answers"} - set(ds.column_names)
    if missing:
        raise SquadDataError(f"{name} (split {split!r}): missing SQuAD columns {sorted(missing)}; "
                             f"has {ds.column_names}")
    titles: dict[str, int] = {}
    records = []
    for row in ds:
        title = row.get("title") or ""
        art = titles.setdefault(title, len(titles))
        answers = row["answers"]
        qa = {
            "id": row["id"],
            "question": row["question"],
            "answers": [{"text": t, "answer_start": s} for t, s in zip(answers["text"], answers["answer_start"])],
            "is_impossible": len(answers["text"]) == 0,
        }
        records.append(_Raw(art, title, row["context"], qa, f"row {len(records)}"))
    version = "2.0" if any(r.qa["is_impossible"] for r in records) or "v2" in name else "1.1"
    return _build(records, f"{name}:{split}", version, repair)


@dataclass
class _Raw:
    article: int
    title: str
    context: Any
    qa: Any
    where: str


@dataclass
class _Bad:
    message: str


def _build(records: Sequence[_Raw | _Bad], source: str, version: str, repair: bool) -> SquadData:
    errors: list[str] = []
    examples: list[QAExample] = []
    seen: dict[str, str] = {}
    repaired = 0
    titles: list[str] = []
    for r in records:
        if isinstance(r, _Bad):
            errors.append(r.message)
            continue
        ex, errs, fixed = _validate(r, repair)
        if ex is not None and ex.id in seen:
            errs.append(f"{r.where}, question {ex.id!r}: duplicate id (first seen in {seen[ex.id]})")
        errors.extend(errs)
        if ex is not None and not errs:
            seen[ex.id] = r.where
            examples.append(ex)
            repaired += fixed
            if len(titles) <= r.article:
                titles.extend([""] * (r.article + 1 - len(titles)))
            titles[r.article] = r.title
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        hint = ""
        if any("not found at answer_start" in e for e in errors):
            hint = ("\nAnswers whose text is not at answer_start can be repaired by moving them to the nearest "
                    "occurrence in the context: pass repair=True (--repair-answers on the command line).")
        raise SquadDataError(f"{source}: {len(errors)} problem(s):\n  {shown}{more}{hint}")
    if not examples:
        raise SquadDataError(f"{source}: contains no questions.")
    return SquadData(examples, version, source, repaired, titles)


def _validate(r: _Raw, repair: bool) -> tuple[QAExample | None, list[str], int]:
    qa = r.qa
    if not isinstance(qa, dict):
        return None, [f"{r.where}: question record is not an object"], 0
    qid = qa.get("id")
    where = f"{r.where}, question {qid!r}"
    errs = []
    if not isinstance(qid, str) or not qid:
        errs.append(f"{r.where}: question without a string 'id'")
    if not isinstance(r.context, str) or not r.context.strip():
        errs.append(f"{where}: empty or missing 'context'")
    question = qa.get("question")
    if not isinstance(question, str) or not question.strip():
        errs.append(f"{where}: empty or missing 'question'")
    raw_answers = qa.get("answers")
    if not isinstance(raw_answers, list):
        errs.append(f"{where}: missing field 'answers' (a list)")
    if errs:
        return None, errs, 0
    impossible = bool(qa.get("is_impossible", False))
    if not impossible and not raw_answers:
        errs.append(f"{where}: no answers and not marked 'is_impossible'")
    answers, fixed = [], 0
    for k, ans in enumerate(raw_answers):
        text, start = (ans.get("text"), ans.get("answer_start")) if isinstance(ans, dict) else (None, None)
        awhere = f"{where}, answer {k + 1}"
        if not isinstance(text, str) or not text:
            errs.append(f"{awhere}: missing or empty 'text'")
            continue
        if not isinstance(start, int) or isinstance(start, bool):
            errs.append(f"{awhere}: missing or non-integer 'answer_start'")
            continue
        if not 0 <= start < len(r.context):
            errs.append(f"{awhere}: answer_start {start} is outside the context (length {len(r.context)})")
            continue
        if r.context[start : start + len(text)] != text:
            near = nearest_occurrence(r.context, text, start)
            if repair and near is not None:
                start, fixed = near, fixed + 1
            else:
                found = f"; nearest occurrence at {near}" if near is not None else "; text does not occur in the context"
                errs.append(f"{awhere}: text {text!r} not found at answer_start {start} "
                            f"(context there reads {r.context[start:start + len(text)]!r}{found})")
                continue
        answers.append(Answer(text, start))
    ex = QAExample(qid, r.title, r.context, question, tuple(answers), impossible, r.article)
    return ex, errs, fixed


def nearest_occurrence(context: str, text: str, start: int) -> int | None:
    """Start of the occurrence of ``text`` in ``context`` closest to ``start`` (None if it never occurs)."""
    best, i = None, context.find(text)
    while i != -1:
        if best is None or abs(i - start) < abs(best - start):
            best = i
        i = context.find(text, i + 1)
    return best


def write_squad_json(examples: Iterable[QAExample], path: str | Path, version: str = "1.1") -> None:
    """Write examples in the official JSON format (used for small test and demo data)."""
    articles: dict[int, dict] = {}
    for ex in examples:
        art = articles.setdefault(ex.article, {"title": ex.title, "paragraphs": []})
        paras = art["paragraphs"]
        if not paras or paras[-1]["context"] != ex.context:
            paras.append({"context": ex.context, "qas": []})
        qa: dict[str, Any] = {"id": ex.id, "question": ex.question,
                              "answers": [{"text": a.text, "answer_start": a.start} for a in ex.answers]}
        if version.startswith("2"):
            qa["is_impossible"] = ex.is_impossible
        paras[-1]["qas"].append(qa)
    Path(path).write_text(json.dumps({"version": version, "data": list(articles.values())}, ensure_ascii=False),
                          encoding="utf-8")
