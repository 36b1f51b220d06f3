r"""Real text without a download: a character-level corpus from the running Python's own files.

The built-in corpus ``"python-docs"`` is pydoc's topic texts (``pydoc_data/topics.py``, the
language reference that ``help("if")`` prints, about 465,000 characters) followed by the
sources of the standard-library modules in :data:`STDLIB_MODULES`. It changes between Python
versions, so a :class:`Corpus` carries the ``python_version`` and a sha256 ``checksum`` of
its UTF-8 bytes: two runs with the same checksum read the same text.

Tokens are characters (Unicode code points); the vocabulary is the sorted set of characters
that occur. The split is deterministic: the text is cut into blocks of ``block_len``
characters and every ``valid_every``-th block (the last of each group) is held out for
validation, so both splits sample the whole corpus, prose and code alike. A
:class:`CorpusTask` draws random windows from the training blocks with the loss on every
position; :meth:`Corpus.validation_windows` gives the fixed evaluation windows.

:func:`load_text_file` reads a user's own UTF-8 file in pieces, so a large file never has
to be decoded in one go.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .._checks import check_int
from .base import Batch, check_rng

BUILTIN = "python-docs"
# the standard-library modules appended to the topic texts, in this order (plain ASCII
# sources of moderate size, present in every CPython since 3.0)
STDLIB_MODULES = ("textwrap", "string", "heapq", "bisect", "colorsys", "fnmatch", "glob",
                  "difflib")
PIECE_BYTES = 1 << 20         # a user file is read and decoded 1 MiB at a time
MAX_CHARS = 20_000_000        # and at most this many characters are used


@dataclass(frozen=True, eq=False)
class Corpus:
    """A character-level text: ids, vocabulary, the train/validation split and a checksum.

    Attributes:
        name: ``"python-docs"`` or the file's name.
        vocab: the characters, sorted by code point; token ``i`` is ``vocab[i]``.
        ids: ``(n_chars,)`` int64 token ids of the whole text.
        checksum: sha256 hex digest of the text's UTF-8 bytes.
        python_version: the interpreter that built the corpus (``"3.11.7"``).
        block_len, valid_every: the split (see the module docstring).
    """

    name: str
    vocab: tuple
    ids: np.ndarray = field(repr=False)
    checksum: str
    python_version: str
    block_len: int = 4096
    valid_every: int = 10

    @property
    def n_chars(self) -> int:
        return int(self.ids.size)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _blocks(self):
        """``[(start, stop, is_validation)]`` for every block of the text."""
        n, L = self.n_chars, self.block_len
        return [(s, min(s + L, n), i % self.valid_every == self.valid_every - 1)
                for i, s in enumerate(range(0, n, L))]

    def runs(self, split: str) -> list:
        """The contiguous pieces of a split (``"train"`` or ``"valid"``) as id arrays."""
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        want_valid = split == "valid"
        runs, cur = [], None
        for start, stop, is_valid in self._blocks():
            if is_valid != want_valid:
                cur = None
                continue
            if cur is not None and cur[1] == start:
                cur[1] = stop  # neighbouring blocks of one split are one piece of text
            else:
                cur = [start, stop]
                runs.append(cur)
        return [self.ids[a:b] for a, b in runs]

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in np.asarray(ids).ravel())

    def encode(self, text: str) -> np.ndarray:
        index = {ch: i for i, ch in enumerate(self.vocab)}
        missing = sorted(set(text) - set(index))
        if missing:
            raise ValueError(f"text has characters outside the vocabulary: {missing[:10]}")
        return np.array([index[ch] for ch in text], dtype=np.int64)

    def info(self) -> dict:
        """The results' ``"corpus"`` record."""
        return {"name": self.name, "checksum": self.checksum, "n_chars": self.n_chars,
                "python_version": self.python_version}

    def validation_windows(self, length: int, max_windows: int | None = None) -> np.ndarray:
        """Non-overlapping windows of ``length + 1`` ids from the validation split.

        Each window lies inside one validation piece (never across a gap). With
        ``max_windows``, that many are taken evenly spaced over all of them.

        Returns:
            ``(n, length + 1)`` ids: inputs are ``[:, :-1]``, targets ``[:, 1:]``.
        """
        check_int("length", length, minimum=1)
        wins = [run[i:i + length + 1] for run in self.runs("valid")
                for i in range(0, run.size - length, length + 1)]
        if not wins:
            raise ValueError(f"the validation split of {self.name!r} has no window of "
                             f"{length + 1} characters (its pieces are shorter)")
        wins = np.stack(wins)
        if max_windows is not None and check_int("max_windows", max_windows, minimum=1) < len(wins):
            wins = wins[np.linspace(0, len(wins) - 1, max_windows).round().astype(int)]
        return wins


def from_text_pieces(pieces, *, name: str, block_len: int = 4096, valid_every: int = 10,
                     python_version: str | None = None) -> Corpus:
    """A :class:`Corpus` from an iterable of text pieces (joined without separators)."""
    sha = hashlib.sha256()
    points = []
    for piece in pieces:
        sha.update(piece.encode("utf-8"))
        points.append(np.frombuffer(piece.encode("utf-32-le"), dtype="<u4"))
    cps = np.concatenate(points) if points else np.zeros(0, dtype="<u4")  # (n_chars,)
    alphabet = np.unique(cps)
    ids = np.searchsorted(alphabet, cps).astype(np.int64)
    return Corpus(name=name, vocab=tuple(chr(int(c)) for c in alphabet), ids=ids,
                  checksum=sha.hexdigest(),
                  python_version=python_version or platform.python_version(),
                  block_len=check_int("block_len", block_len, minimum=2),
                  valid_every=check_int("valid_every", valid_every, minimum=2))


def builtin_sources() -> list:
    """``[(label, text)]`` of the built-in corpus: pydoc topics, then :data:`STDLIB_MODULES`."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data
        raise RuntimeError("this Python has no pydoc_data.topics; use --text FILE") from e
    out = [(f"pydoc topic {k}", topics[k] + "\n\n") for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for mod in STDLIB_MODULES:
        path = stdlib / f"{mod}.py"
        if path.exists():  # a missing module changes the checksum, which is recorded
            out.append((f"{mod}.py", path.read_text(encoding="utf-8") + "\n\n"))
    return out


def python_corpus(**split) -> Corpus:
    """The built-in corpus ``"python-docs"`` of this interpreter."""
    return from_text_pieces((text for _, text in builtin_sources()), name=BUILTIN, **split)


def read_text_pieces(path, *, piece_bytes: int = PIECE_BYTES, max_chars: int = MAX_CHARS):
    """Yield the UTF-8 text of ``path`` in pieces (at most ``max_chars`` characters in all).

    Raises ``ValueError`` naming the file if it is not UTF-8 text: undecodable bytes, or a
    NUL character (the mark of a binary file).
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    left = max_chars
    with open(path, "rb") as f:
        while left > 0:
            raw = f.read(piece_bytes)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e.reason} near byte "
                                 f"{f.tell() - len(raw) + e.start}); is it a binary file?") from e
            if "\x00" in text:
                raise ValueError(f"{path} contains NUL bytes: it looks like a binary file, "
                                 "not UTF-8 text")
            if text:
                yield text[:left]
                left -= len(text)
            if not raw:
                break


def load_text_file(path, *, min_chars: int = 0, block_len: int = 4096,
                   valid_every: int = 10) -> Corpus:
    """A :class:`Corpus` from a user's UTF-8 text file, read in pieces.

    A text shorter than ``valid_every`` blocks gets shorter blocks (``n_chars //
    valid_every``), so it still has a validation split.

    Args:
        path: the file.
        min_chars: refuse a file with fewer characters (the experiment passes
            :func:`min_chars_for` its window length).

    Raises:
        ValueError: naming the file, if it is missing, empty, binary, not UTF-8, or
            shorter than ``min_chars``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty")
    corpus = from_text_pieces(read_text_pieces(path), name=path.name, block_len=block_len,
                              valid_every=valid_every)
    if corpus.n_chars < max(min_chars, 2 * valid_every):
        raise ValueError(f"{path} has {corpus.n_chars} characters, too short: need at least "
                         f"{max(min_chars, 2 * valid_every)} for one training batch and one "
                         "validation window")
    if corpus.n_chars < valid_every * block_len:
        corpus = replace(corpus, block_len=corpus.n_chars // valid_every)
    return corpus


def min_chars_for(length: int, valid_every: int = 10) -> int:
    """The shortest text with a training and a validation window of ``length + 1`` ids."""
    return valid_every * (check_int("length", length, minimum=1) + 1)


@dataclass(frozen=True, eq=False)
class CorpusTask:
    """Next-character prediction on random windows of one split of a corpus.

    ``split`` is ``"train"`` (the default) or ``"valid"``. Every position is scored
    (``mask`` all True); ``metric`` is ``"token"`` and ``chance`` is the accuracy of a
    uniform guess, ``1 / vocab_size``.
    """

    corpus: Corpus
    length: int = 256
    split: str = "train"

    metric = "token"

    def __post_init__(self):
        if not isinstance(self.corpus, Corpus):
            raise TypeError(f"corpus must be a Corpus, got {type(self.corpus).__name__}")
        check_int("length", self.length, minimum=1)
        runs = [r for r in self.corpus.runs(self.split) if r.size > self.length]
        if not runs:
            raise ValueError(f"the {self.split} split of {self.corpus.name!r} has no window of "
                             f"{self.length + 1} characters")
        object.__setattr__(self, "_runs", runs)
        # a window start is drawn uniformly over every valid start of every piece
        object.__setattr__(self, "_starts", np.cumsum([r.size - self.length for r in runs]))

    @property
    def vocab_size(self) -> int:
        return self.corpus.vocab_size

    @property
    def chance(self) -> float:
        return 1.0 / self.corpus.vocab_size

    def sample(self, rng, batch_size: int) -> Batch:
        check_rng(rng)
        check_int("batch_size", batch_size, minimum=1)
        picks = rng.integers(self._starts[-1], size=batch_size)
        seqs = []
        for u in picks:
            r = int(np.searchsorted(self._starts, u, side="right"))
            offset = int(u - (self._starts[r - 1] if r else 0))
            seqs.append(self._runs[r][offset:offset + self.length + 1])
        s = np.stack(seqs)  # (B, T + 1)
        return Batch(s[:, :-1].copy(), s[:, 1:].copy(), np.ones((batch_size, self.length), bool))
