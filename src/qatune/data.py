"""SQuAD data: load (official JSON or Hugging Face datasets), validate, split by article, subsample.

Everything downstream works on one in-memory type, :class:`QAExample`, whatever the source. Bad input
is refused with a message that names the file, the record and the problem, because a silent mismatch
between ``answer_start`` and ``text`` turns into wrong labels and a quietly worse model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qatune.errors import ConfigError, FileError, QatuneError, read_json

MAX_REPORTED_ERRORS = 10
GET_SQUAD = ("To get SQuAD: give the datasets id rajpurkar/squad (v1.1) or rajpurkar/squad_v2 (with :train or "
             ":validation), or download the official files: curl -LO "
             "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json (train-v1.1.json, dev-v2.0.json, "
             "train-v2.0.json alike)")


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


def parse_ranges(spec: str) -> list[int]:
    """Parse 1-based inclusive ranges such as ``"1-36"`` or ``"1-10,15,20-22"`` into 0-based indices."""
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError as e:
            raise SquadDataError(f"bad article range {spec!r}: use 1-based numbers like '1-36' or '1-10,15'") from e
        if a < 1 or b < a:
            raise SquadDataError(f"bad article range {part!r} in {spec!r}: need 1 <= start <= end")
        out.extend(range(a - 1, b))
    if not out:
        raise SquadDataError(f"article range {spec!r} names no article: use 1-based numbers like '1-36' or '1-10,15'")
    return out


def select_articles(data: SquadData, spec: str | None) -> SquadData:
    """Keep the articles named by 1-based ranges in file order (``None`` keeps everything)."""
    if not spec:
        return data
    wanted = parse_ranges(spec)
    n = len(data.titles)
    if max(wanted) >= n:
        raise SquadDataError(f"{data.source}: article range {spec!r} goes past the last article ({n}).")
    keep = set(wanted)
    return data.with_examples([ex for ex in data.examples if ex.article in keep])


def subsample(examples: Sequence[QAExample], questions: int | float | None, seed: int) -> list[QAExample]:
    """Draw a subset by question count (int) or fraction (float in (0, 1]) with a seed, keeping file order.

    Subsets of one seed are nested (the 25% subset contains the 10% one), so data-volume sweeps differ only
    in how much data they see, not which.
    """
    n_total = len(examples)
    if questions is None:
        return list(examples)
    if isinstance(questions, float) and not isinstance(questions, bool):
        if not 0 < questions <= 1:
            raise SquadDataError(f"question fraction must be in (0, 1], got {questions}")
        n = max(1, round(questions * n_total))
    else:
        n = int(questions)
        if not 0 < n <= n_total:
            raise SquadDataError(f"asked for {n} questions but only {n_total} are available")
    order = list(range(n_total))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:n])]


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


def load_split(source: str, split: str, articles: str | None, questions, seed: int, repair: bool,
               role: str = "") -> SquadData:
    """The articles, then the questions, of one data source; ``role`` (train/eval) names the options in errors."""
    data = load_squad(source, split=split, repair=repair)
    try:
        data = select_articles(data, articles)
        return data.with_examples(subsample(data.examples, questions, seed))
    except SquadDataError as e:
        if not role:
            raise
        raise SquadDataError(f"{role}_articles / {role}_questions: {e}") from e


VALIDATION_SEED = 0  # one validation selection for every run of a study, whatever its seed or data volume
EVAL_SEED = 0  # one draw of eval_questions for every run: seeds and configurations are scored on the same questions


def hold_out(data: SquadData, share: float) -> tuple[SquadData, SquadData]:
    """Split ``data`` by article into (rest, held out): ``share`` of its articles (at least one, at most all but
    one), chosen by a hash of the title, so the held-out articles do not depend on the run's seed or volume."""
    import hashlib

    titles = sorted({ex.title for ex in data.examples})
    if len(titles) < 2:
        raise SquadDataError(f"{data.source}: validation_share needs at least 2 training articles to hold some out; "
                             f"the selection has {len(titles)}")
    ranked = sorted(titles, key=lambda t: hashlib.sha256(f"{VALIDATION_SEED}:{t}".encode()).hexdigest())
    held = set(ranked[: min(len(titles) - 1, max(1, round(share * len(titles))))])
    return (data.with_examples([ex for ex in data.examples if ex.title not in held]),
            data.with_examples([ex for ex in data.examples if ex.title in held]))


def load_training(cfg, test: SquadData | None = None) -> tuple[SquadData, SquadData | None]:
    """A run's training data and its validation data (None without): ``validation_data`` with its own articles and
    questions, or ``validation_share`` of the training articles held out before the training questions are drawn.

    No article is in two roles: validation articles that are also training articles (same title) are refused, and
    so is a test (``eval_data``) selection that shares an article with either, whatever the files (dev-v1.1 and
    dev-v2.0 share their titles). ``test`` is the run's evaluation selection when the caller has it; with
    ``eval_data`` set it is otherwise loaded here to be checked. SQuAD v2 test data without validation data tunes
    its null threshold on the test questions (an oracle): refused unless ``oracle_threshold`` (a study sets it off).
    """
    if not cfg.validation_share:
        train = articles = load_role(cfg, "train")
        validation = None
        if cfg.validation_data:
            validation = load_split(cfg.validation_data, cfg.validation_split, cfg.validation_articles,
                                    cfg.validation_questions, VALIDATION_SEED, cfg.repair_answers, "validation")
            _refuse_shared_titles(cfg, train, "train", validation, "validation",
                                  "choose validation articles apart from the training ones (validation_articles), or "
                                  "hold some out with validation_share")
    else:
        articles = load_split(cfg.train_data, cfg.train_split, cfg.train_articles, None, cfg.seed,
                              cfg.repair_answers, "train")
        rest, validation = hold_out(articles, cfg.validation_share)
        try:
            train = rest.with_examples(subsample(rest.examples, cfg.train_questions, cfg.seed))
        except SquadDataError as e:
            raise SquadDataError(f"train_questions (after holding out {len(articles) - len(rest)} questions of "
                                 f"validation articles): {e}") from e
    if test is None and cfg.eval_data:
        test = load_role(cfg, "eval")
    if test is not None:
        # with validation_share the held-out validation articles are training articles too: the test data is
        # checked against all of train_articles
        _refuse_shared_titles(cfg, articles, "train", test, "eval",
                              "test articles must never be trained on: choose eval_data / eval_articles apart from "
                              "train_data / train_articles")
        if cfg.validation_data:
            _refuse_shared_titles(cfg, validation, "validation", test, "eval",
                                  "choose validation_data / validation_articles apart from the test articles, or hold "
                                  "some training articles out with validation_share")
        if validation is None and test.version.startswith("2") and not cfg.oracle_threshold:
            raise ConfigError(f"{test.source}: SQuAD v2 test data without validation data: its null threshold would "
                              f"be tuned on the test questions (an oracle); give validation data (validation_share, "
                              f"e.g. 0.1, or validation_data) so the threshold is tuned there")
    return train, validation


ROLE_NAMES = {"train": "training", "validation": "validation", "eval": "test"}


def _selection(cfg, role: str, data: SquadData) -> str:
    """A data selection as a person gave it: its source and its article range ("all articles" when unset)."""
    if role == "validation" and cfg.validation_share:
        return f"validation_share {cfg.validation_share} of {_selection(cfg, 'train', data)}"
    spec = getattr(cfg, f"{role}_articles")
    return f"{data.source} ({f'{role}_articles {spec!r}' if spec else 'all articles'})"


def _refuse_shared_titles(cfg, first: SquadData, first_role: str, second: SquadData, second_role: str,
                          fix: str) -> None:
    """Refuse ``second`` when one of its articles (by title) is one of ``first``'s: the same article in two roles
    (training, validation, test). Blank titles (datasets without a title column) tell nothing and are left out."""
    shared = sorted(({ex.title for ex in first.examples} & {ex.title for ex in second.examples}) - {""})
    if shared:
        shown = ", ".join(repr(t) for t in shared[:3]) + (f" and {len(shared) - 3} more" if len(shared) > 3 else "")
        raise SquadDataError(f"{_selection(cfg, second_role, second)}: {len(shared)} {ROLE_NAMES[second_role]} "
                             f"article(s) are also {ROLE_NAMES[first_role]} articles of "
                             f"{_selection(cfg, first_role, first)}, by title: {shown}; {fix}")


def load_role(cfg, role: str) -> SquadData:
    """The ``role`` ("train" or "eval") data of a training configuration: its ``{role}_data``, ``_split``,
    ``_articles`` and ``_questions`` options (``cfg`` a TrainConfig or its dict). Training questions are drawn with
    the run's seed; evaluation questions with ``EVAL_SEED``, the same for every run, so that a study's seeds and
    configurations are compared question by question."""
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    return load_split(get(f"{role}_data"), get(f"{role}_split"), get(f"{role}_articles"), get(f"{role}_questions"),
                      EVAL_SEED if role == "eval" else get("seed"), get("repair_answers"), role)
