"""Shared fixtures: small SQuAD-format data written by the tests themselves, the MiniLM tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from qatune.data.squad import Answer, QAExample, write_squad_json

SHARED_SQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad"

NAMES = ["Zorvania", "Quellburg", "Amaranth", "Besseltown", "Corvid", "Dunmore", "Elstree", "Fenwick",
         "Galloway", "Harrowgate", "Ingleby", "Jarrow", "Kestrel", "Lowther", "Marlow", "Northam"]
THINGS = ["river", "bridge", "castle", "library", "harbour", "mountain", "forest", "market"]


def method_settings(name: str, **options) -> dict:
    """A fine-tuning method's settings as a run with these options would give them (the rest at their defaults)."""
    from qatune.config import TrainConfig
    from qatune.methods import method

    return method(name).settings(TrainConfig(strategy=name, **options))


def owners(option: str) -> str:
    """The methods that read ``option``, as a refusal names them ("lora, dora, pissa")."""
    from qatune.methods import METHODS

    return ", ".join(m.name for m in METHODS.values() if option in m.options)


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
    from qatune.model.load import load_tokenizer

    return load_tokenizer("minilm-l6")


def shared_file(name: str) -> Path:
    path = SHARED_SQUAD / name
    if not path.exists():
        pytest.skip(f"real SQuAD data not present at {path}")
    return path


def save_tiny_model(path: Path, kind: str, dropout: float = 0.1) -> Path:
    """A small random-weight MobileBERT or DistilBERT QA model with the real uncased vocab, saved like a hub model."""
    import torch
    from transformers import (
        DistilBertConfig,
        DistilBertForQuestionAnswering,
        DistilBertTokenizerFast,
        MobileBertConfig,
        MobileBertForQuestionAnswering,
    )

    from qatune.model.load import resolve_model

    torch.manual_seed(0)
    vocab = Path(resolve_model("minilm-l6")) / "vocab.txt"
    if kind == "mobilebert":
        cfg = MobileBertConfig(num_hidden_layers=2, hidden_size=64, embedding_size=32, intra_bottleneck_size=32,
                               true_hidden_size=32, intermediate_size=64, num_attention_heads=2,
                               num_feedforward_networks=2, hidden_dropout_prob=dropout,
                               attention_probs_dropout_prob=dropout)
        model = MobileBertForQuestionAnswering(cfg)
        from transformers import BertTokenizerFast as Tok
    elif kind == "distilbert":
        cfg = DistilBertConfig(n_layers=2, dim=64, hidden_dim=128, n_heads=2, dropout=dropout, qa_dropout=dropout,
                               attention_dropout=dropout)
        model = DistilBertForQuestionAnswering(cfg)
        Tok = DistilBertTokenizerFast
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    Tok(vocab_file=str(vocab), do_lower_case=True).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {k: save_tiny_model(root / k, k) for k in ("mobilebert", "distilbert")}


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train-v1.1.json"
    write_squad_json(make_examples(n_articles=4, per_article=6), path)
    return path
