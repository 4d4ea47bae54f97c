"""The articles and questions a run sees in each role (training, validation, test): article ranges in file order,
seeded question draws, a validation share held out of the training articles by title, and the checks that no
article is in two roles."""

from __future__ import annotations

import random
from collections.abc import Sequence

from qatune.data.squad import QAExample, SquadData, SquadDataError, load_squad
from qatune.errors import ConfigError


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
