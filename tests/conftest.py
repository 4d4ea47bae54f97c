"""Shared fixtures: small SQuAD-format data written by the tests themselves, the MiniLM tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from qatune.data import Answer, QAExample, write_squad_json

SHARED_SQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad"

NAMES = ["Zorvania", "Quellburg", "Amaranth", "Besseltown", "Corvid", "Dunmore", "Elstree", "Fenwick",
         "Galloway", "Harrowgate", "Ingleby", "Jarrow", "Kestrel", "Lowther", "Marlow", "Northam"]
THINGS = ["river", "bridge", "castle", "library", "harbour", "mountain", "forest", "market"]


def make_examples(n_articles: int = 3, per_article: int = 4, seed: int = 0, unanswerable: int = 0,
                  filler: int = 2) -> list[QAExample]:
    """Synthetic articles: each paragraph states facts "The <thing> of <A> is <B>." and asks about one.

    ``filler`` adds neutral sentences so contexts can be made longer than a window.
    """
    rng = random.Random(seed)
    out = []
    for a in range(n_articles):
        title = f"Article_{a}"
        for q in range(per_article):
            pairs = rng.sample([(t, p) for t in THINGS for p in NAMES], 4)  # distinct, so questions are unambiguous
            facts = [(t, p, rng.choice(NAMES) + str(rng.randint(1, 99))) for t, p in pairs]
            sentences = [f"The {t} of {p} is called {n}." for t, p, n in facts]
            sentences += [f"Visitors often walk near the {rng.choice(THINGS)} in spring." for _ in range(filler)]
            rng.shuffle(sentences)
            context = " ".join(sentences)
            thing, place, name = facts[0]
            start = context.index(f"The {thing} of {place} is called {name}.") + len(f"The {thing} of {place} is called ")
            qid = f"q{a}_{q}"
            impossible = len(out) < unanswerable
            question = f"What is the {thing} of {place} called?"
            answers = () if impossible else (Answer(name, start),)
            if impossible:
                question = "What is the name of the moon of Jupiter in this text?"
            out.append(QAExample(qid, title, context, question, answers, impossible, a))
    return out


@pytest.fixture
def small_squad(tmp_path) -> Path:
    path = tmp_path / "small-v1.1.json"
    write_squad_json(make_examples(), path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from qatune.models import load_tokenizer

    return load_tokenizer("minilm-l6")


def shared_file(name: str) -> Path:
    path = SHARED_SQUAD / name
    if not path.exists():
        pytest.skip(f"real SQuAD data not present at {path}")
    return path
