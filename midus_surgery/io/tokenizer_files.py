"""Which files of a model folder are its tokenizer's, read as names only (nothing is opened but to check its kind)."""

from __future__ import annotations

from pathlib import Path

from midus_surgery.io.small_files import regular_file_problem

TOKENIZER_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "spiece", "sentencepiece", "special_tokens_map", "added_tokens")


def has_tokenizer_files(directory: Path) -> bool:
    return any(p.name.startswith(TOKENIZER_FILE_PREFIXES) for p in Path(directory).iterdir())


def odd_tokenizer_files(directory: Path) -> str | None:
    """Why a model folder's tokenizer files cannot be read (one that is a named pipe, a device or a folder), or None.
    transformers opens tokenizer_config.json as it finds it: a pipe there made eval wait forever (trial66)."""
    odd = [p.name for p in sorted(Path(directory).iterdir()) if p.name.startswith(TOKENIZER_FILE_PREFIXES) and regular_file_problem(p)]
    return (f"{', '.join(odd[:3])} {'is' if len(odd) == 1 else 'are'} not a regular file (a named pipe, a device or a folder), "
            "so no tokenizer reads it") if odd else None
