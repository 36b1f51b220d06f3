r"""The six MAD tasks (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid
Architectures"), the synthetic token-mixing suite of the NeurIPS version of Titans (Table 10).

Written from the published task descriptions; the defaults are MAD's baseline settings (the
miniature sizes of ``minititans mad`` are in :mod:`minititans.experiments.mad`):

* :class:`InContextRecallTask` — multi-query recall: ``k v k v ...``; a key seen before
  must be followed by its value (vocab 16, length 128).
* :class:`FuzzyInContextRecallTask` — the same with keys and values that are motifs of
  1-3 adjacent tokens (vocab 16, length 128).
* :class:`NoisyInContextRecallTask` — recall with pairs replaced by noise tokens from a
  vocabulary of their own (vocab 32 of which 16 are noise, 20% noise).
* :class:`SelectiveCopyingTask` — tokens scattered among blanks, copied in order after a
  ``COPY`` token (vocab 16, length 256, 16 tokens).
* :class:`CompressionTask` — rebuild a random sequence from the last token's
  representation alone (vocab 16, length 32): needs a bottleneck decoder, see
  ``CompressionTask.autoencoder``.
* :class:`MemorizationTask` — a fixed key->value map learnt over training, not in context
  (vocab 256, length 32).

Every task has ``metric = "token"``: MAD scores each answer token on its own. A batch
depends only on the generator passed to ``sample``; ``mask`` marks the scored positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import check_int
from .base import Batch, check_rng


def _check_fraction(name, value, *, high_open=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    if not (0 <= value < 1 if high_open else 0 <= value <= 1):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _batch(rows) -> Batch:
    """``rows``: ``(inputs (T,), targets (T,), mask (T,))`` per sequence -> a Batch."""
    x, y, m = zip(*rows)
    return Batch(np.stack(x).astype(np.int64), np.stack(y).astype(np.int64),
                 np.stack(m).astype(bool))


def _shifted(tokens, scored):
    """Next-token data from ``tokens`` ``(T + 1,)``: position t predicts token t + 1,
    scored where ``scored[t + 1]`` (``scored`` marks answer tokens in ``tokens``)."""
    tokens, scored = np.asarray(tokens), np.asarray(scored, dtype=bool)
    return tokens[:-1], tokens[1:], scored[1:]


@dataclass(frozen=True)
class InContextRecallTask:
    r"""Multi-query in-context recall: ``length / 2`` pairs ``k v``, keys drawn with repetition.

    Keys are the tokens ``[0, n/2)`` and values ``[n/2, n)`` with ``n = vocab_size -
    noise_vocab_size``; within a sequence each key keeps one value (a fresh random map per
    sequence). Every key that was already seen is a query: its position predicts its value.
    The last pair always repeats a seen key. With ``frac_noise > 0`` each pair is replaced,
    with that probability, by two tokens of the noise vocabulary ``[n, vocab_size)`` (one pair
    is kept, so a key is always there to recall). The input has ``length`` tokens; its last
    position (the final value) is not scored.
    """

    metric = "token"

    vocab_size: int = 16
    length: int = 128
    noise_vocab_size: int = 0
    frac_noise: float = 0.0

    def __post_init__(self):
        check_int("length", self.length, minimum=4)
        if self.length % 2:
            raise ValueError(f"length must be even (pairs of tokens), got {self.length}")
        check_int("noise_vocab_size", self.noise_vocab_size, minimum=0)
        check_int("vocab_size", self.vocab_size, minimum=self.noise_vocab_size + 2)
        _check_fraction("frac_noise", self.frac_noise)
        if self.frac_noise > 0 and self.noise_vocab_size == 0:
            raise ValueError("frac_noise > 0 needs noise_vocab_size > 0")

    @property
    def num_keys(self) -> int:
        return (self.vocab_size - self.noise_vocab_size) // 2

    @property
    def num_values(self) -> int:
        return self.vocab_size - self.noise_vocab_size - self.num_keys

    @property
    def answer_len(self) -> int:
        return 1

    @property
    def chance(self) -> float:
        """Guessing one of the value tokens."""
        return 1.0 / self.num_values

    def sequence(self, rng) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens (length + 1,), scored (length + 1,))``; the last token is a dummy."""
        P, nk = self.length // 2, self.num_keys
        n = self.vocab_size - self.noise_vocab_size
        keep = rng.integers(P - 1)  # this pair is never noise
        kv, tokens, scored = {}, [], []
        for i in range(P - 1):
            if i != keep and self.frac_noise > 0 and rng.random() < self.frac_noise:
                tokens += list(rng.integers(n, self.vocab_size, size=2))
                scored += [False, False]
                continue
            k = int(rng.integers(nk))
            seen = k in kv
            if not seen:
                kv[k] = nk + int(rng.integers(self.num_values))
            tokens += [k, kv[k]]
            scored += [False, seen]
        k = int(rng.choice(sorted(kv)))  # the final query repeats a seen key
        tokens += [k, kv[k], 0]
        scored += [False, True, False]
        return np.array(tokens), np.array(scored)

    def sample(self, rng, batch_size: int) -> Batch:
        check_rng(rng)
        check_int("batch_size", batch_size, minimum=1)
        return _batch([_shifted(*self.sequence(rng)) for _ in range(batch_size)])


@dataclass(frozen=True)
class NoisyInContextRecallTask(InContextRecallTask):
    """In-context recall with 20% of the pairs replaced by noise tokens.

    MAD's setting: vocab 32 of which 16 are noise tokens, so keys and values are the same
    8 + 8 tokens as in :class:`InContextRecallTask`. A model must learn (over training) to
    ignore the noise vocabulary.
    """

    vocab_size: int = 32
    noise_vocab_size: int = 16
    frac_noise: float = 0.2


def _motif(rng, low, high, size):
    """``size`` distinct tokens from ``[low, high)`` in random order (one permutation)."""
    return tuple(int(t) for t in low + rng.choice(high - low, size=size, replace=False))


@dataclass(frozen=True)
class FuzzyInContextRecallTask:
    r"""In-context recall where keys and values are motifs of 1..``motif_size`` tokens.

    A motif is an ordered tuple of distinct tokens: keys from ``[0, n/2)``, values from
    ``[n/2, n)``, ``n = vocab_size - 1``; the token ``vocab_size - 1`` pads the front.
    Pairs follow each other with no separator, so a model must group adjacent tokens
    itself. A key seen before is a query: every token of its value is scored (teacher
    forced). One random pair is planted early and asked again at the end. ``fixed_keys=True``
    makes every key ``motif_size`` tokens long (MAD's evaluation sets); training draws key
    lengths at random.
    """

    metric = "token"

    vocab_size: int = 16
    length: int = 128
    motif_size: int = 3
    fixed_keys: bool = False

    def __post_init__(self):
        check_int("motif_size", self.motif_size, minimum=1)
        check_int("vocab_size", self.vocab_size, minimum=2 * self.motif_size + 1)
        check_int("length", self.length, minimum=6 * self.motif_size)
        if not isinstance(self.fixed_keys, bool):
            raise TypeError(f"fixed_keys must be True or False, got {self.fixed_keys!r}")

    @property
    def pad(self) -> int:
        return self.vocab_size - 1

    @property
    def num_keys(self) -> int:
        return (self.vocab_size - 1) // 2

    @property
    def answer_len(self) -> int:
        return self.motif_size

    @property
    def chance(self) -> float:
        """Guessing one of the value tokens."""
        return 1.0 / (self.vocab_size - 1 - self.num_keys)

    def _key(self, rng):
        m = self.motif_size if self.fixed_keys else int(rng.integers(1, self.motif_size + 1))
        return _motif(rng, 0, self.num_keys, m)

    def _value(self, rng):
        return _motif(rng, self.num_keys, self.vocab_size - 1,
                      int(rng.integers(1, self.motif_size + 1)))

    def sequence(self, rng) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens (length + 1,), scored (length + 1,))``, front-padded with ``pad``."""
        L, m = self.length, self.motif_size
        probe = (self._key(rng), self._value(rng))  # planted once, asked again at the end
        size = len(probe[0]) + len(probe[1])
        room = L + 1 - 2 * size - 2 * m  # pairs start before this; the probe fits twice after
        plant_at = int(rng.integers(room))
        kv, tokens, scored, seen = {probe[0]: probe[1]}, [], [], set()
        while len(tokens) < room or probe[0] not in seen:
            k = probe[0] if len(tokens) >= plant_at and probe[0] not in seen else self._key(rng)
            if k not in kv:
                kv[k] = self._value(rng)
            tokens += list(k) + list(kv[k])
            scored += [False] * len(k) + [k in seen] * len(kv[k])
            seen.add(k)
        tokens += list(probe[0]) + list(probe[1])
        scored += [False] * len(probe[0]) + [True] * len(probe[1])
        pad = L + 1 - len(tokens)
        return (np.array([self.pad] * pad + tokens), np.array([False] * pad + scored))

    def sample(self, rng, batch_size: int) -> Batch:
        check_rng(rng)
        check_int("batch_size", batch_size, minimum=1)
        return _batch([_shifted(*self.sequence(rng)) for _ in range(batch_size)])


@dataclass(frozen=True)
class SelectiveCopyingTask:
    r"""Copy ``num_tokens`` tokens scattered among blanks, in order, after a ``COPY`` token.

    The input (``length`` tokens): the tokens to copy at random positions among blanks
    (``BLANK = vocab_size - 2``), then ``COPY = vocab_size - 1``, then ``num_tokens``
    blanks; the ``i``-th blank after ``COPY`` must output the ``i``-th token. The answers are
    not fed back (the inputs after ``COPY`` stay blank), so a model must keep count itself.
    """

    metric = "token"

    vocab_size: int = 16
    length: int = 256
    num_tokens: int = 16

    def __post_init__(self):
        check_int("vocab_size", self.vocab_size, minimum=3)
        check_int("num_tokens", self.num_tokens, minimum=1)
        check_int("length", self.length, minimum=2 * self.num_tokens + 2)

    @property
    def blank(self) -> int:
        return self.vocab_size - 2

    @property
    def copy(self) -> int:
        return self.vocab_size - 1

    @property
    def answer_len(self) -> int:
        return self.num_tokens

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab_size - 2)

    def sample(self, rng, batch_size: int) -> Batch:
        check_rng(rng)
        check_int("batch_size", batch_size, minimum=1)
        L, n = self.length, self.num_tokens
        rows = []
        for _ in range(batch_size):
            x = np.full(L, self.blank)
            y = np.zeros(L, dtype=np.int64)
            m = np.zeros(L, dtype=bool)
            content = rng.integers(self.vocab_size - 2, size=n)
            where = np.sort(rng.choice(L - n - 1, size=n, replace=False))
            x[where] = content
            x[L - n - 1] = self.copy
            y[L - n:] = content  # the i-th blank after COPY answers the i-th token
            m[L - n:] = True
            rows.append((x, y, m))
        return _batch(rows)


@dataclass(frozen=True)
class CompressionTask:
    r"""Rebuild ``length - 1`` random tokens from the representation of a final ``COMPRESS``.

    ``inputs`` are the random tokens from ``[0, vocab_size - 1)`` then ``COMPRESS =
    vocab_size - 1``; ``targets[t] = inputs[t]``, scored for the random tokens. The task
    only makes sense through a bottleneck: the sequence model encodes, and a decoder sees
    the last position's vector plus a position code (MAD's AutoEncoder backbone,
    :class:`minititans.models.AutoEncoder`). A next-token model would copy its own input
    and score 100%, so ``autoencoder = True`` tells :func:`minititans.models.model_for` to
    wrap it (``minititans mad`` and ``minititans train`` build their models with it).
    """

    metric = "token"
    autoencoder = True

    vocab_size: int = 16
    length: int = 32

    def __post_init__(self):
        check_int("vocab_size", self.vocab_size, minimum=3)
        check_int("length", self.length, minimum=2)

    @property
    def compress(self) -> int:
        return self.vocab_size - 1

    @property
    def answer_len(self) -> int:
        return self.length - 1

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab_size - 1)

    def sample(self, rng, batch_size: int) -> Batch:
        check_rng(rng)
        check_int("batch_size", batch_size, minimum=1)
        x = rng.integers(self.vocab_size - 1, size=(batch_size, self.length))
        x[:, -1] = self.compress
        mask = np.ones_like(x, dtype=bool)
        mask[:, -1] = False
        return Batch(x.astype(np.int64), x.astype(np.int64), mask)


@dataclass(frozen=True)
class MemorizationTask:
    r"""A fixed key->value map, the same in every sequence, learnt over training.

    Keys are ``[0, n/2)`` and values ``[n/2, n)``, ``n = vocab_size - 1``; the map (one
    random injective map drawn from ``map_seed``) never changes. A sequence is ``length /
    2`` pairs ``k INSERT`` (``INSERT = vocab_size - 1``): the ``INSERT`` after ``k`` must
    output ``map[k]``, which never appears in the input, so nothing is recalled in context.
    """

    metric = "token"

    vocab_size: int = 256
    length: int = 32
    map_seed: int = 12345

    def __post_init__(self):
        check_int("vocab_size", self.vocab_size, minimum=3)
        check_int("length", self.length, minimum=2)
        if self.length % 2:
            raise ValueError(f"length must be even (pairs of tokens), got {self.length}")
        check_int("map_seed", self.map_seed, minimum=0)

    @property
    def insert(self) -> int:
        return self.vocab_size - 1

    @property
    def num_keys(self) -> int:
        return (self.vocab_size - 1) // 2

    @property
    def kv_map(self) -> np.ndarray:
        """``(num_keys,)``: the value of each key (a function of ``map_seed`` only)."""
        n = self.vocab_size - 1
        values = np.random.default_rng(self.map_seed).permutation(np.arange(self.num_keys, n))
        return values[:self.num_keys]

    @property
    def answer_len(self) -> int:
        return 1

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab_size - 1 - self.num_keys)

    def sample(self, rng, batch_size: int) -> Batch:
        check_rng(rng)
        check_int("batch_size", batch_size, minimum=1)
        P = self.length // 2
        keys = rng.integers(self.num_keys, size=(batch_size, P))
        x = np.full((batch_size, self.length), self.insert)
        x[:, 0::2] = keys
        y = np.zeros_like(x)
        y[:, 1::2] = self.kv_map[keys]
        mask = np.zeros_like(x, dtype=bool)
        mask[:, 1::2] = True
        return Batch(x.astype(np.int64), y.astype(np.int64), mask)


MAD_TASKS = {
    # contract name -> the task class (its defaults are MAD's baseline settings)
    "in_context_recall": InContextRecallTask,
    "fuzzy_in_context_recall": FuzzyInContextRecallTask,
    "noisy_in_context_recall": NoisyInContextRecallTask,
    "selective_copying": SelectiveCopyingTask,
    "compression": CompressionTask,
    "memorization": MemorizationTask,
}
