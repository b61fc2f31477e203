"""Tiny Shakespeare as a character-level corpus: nanoGPT's ``shakespeare_char`` split.

The text is looked for where the image sets are (``--data-dir`` and its
``tinyshakespeare/`` folder, ``$POSITNN_DATA``, ``~/.cache/positnn``) and checked
against its sha256; a missing file raises an error that says how to get it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from .locate import _base_dirs

TEXT_FILE = "input.txt"
TEXT_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TEXT_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


@dataclass(frozen=True)
class CharCorpus:
    """A text as token ids over its sorted character set, split 90/10."""

    chars: str
    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_text(cls, text: str) -> "CharCorpus":
        chars = "".join(sorted(set(text)))
        if len(text) < 20 or len(chars) < 2:
            raise ValueError(f"a character corpus needs at least 20 characters and 2 symbols, got {len(text)} "
                             f"characters and {len(chars)} symbols")
        lookup = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
        n = int(0.9 * len(ids))
        return cls(chars, ids[:n], ids[n:])

    def encode(self, text: str) -> torch.Tensor:
        unknown = sorted(set(text) - set(self.chars))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the corpus' vocabulary")
        return torch.tensor([self.chars.index(c) for c in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())


def load_text(data_dir: str | os.PathLike | None = None) -> CharCorpus:
    """Tiny Shakespeare from ``data_dir`` (or its ``tinyshakespeare/`` folder),
    ``$POSITNN_DATA`` or ``~/.cache/positnn``, checked against its sha256. A file of
    another content is used (a user's own corpus) only when given by ``data_dir``."""
    looked = []
    for i, base in enumerate(_base_dirs(data_dir)):
        for d in (base / "tinyshakespeare", base):
            path = d / TEXT_FILE
            looked.append(str(path))
            if path.is_file():
                raw = path.read_bytes()
                if hashlib.sha256(raw).hexdigest() != TEXT_SHA256 and not (i == 0 and data_dir is not None):
                    raise ValueError(f"{path} is not tiny Shakespeare (sha256 differs from {TEXT_SHA256})")
                return CharCorpus.from_text(raw.decode("utf-8"))
    raise FileNotFoundError(
        "tiny Shakespeare not found; looked for " + ", ".join(looked) + f". Get it with\n  mkdir -p "
        f"~/.cache/positnn/tinyshakespeare && curl -o ~/.cache/positnn/tinyshakespeare/{TEXT_FILE} {TEXT_URL}\n"
        "or pass --data-dir DIR with DIR/input.txt")
