r"""Synthetic tasks with a seed and a controllable length (Titans Section 5, in miniature).

* :class:`NeedleTask` — single needle in a haystack, the paper's S-NIAH (Table 2):
  ``"pk"`` a one-digit passkey in a repetitive haystack, ``"n"`` a 3-digit number and
  ``"w"`` a 4-symbol UUID-like hex value, both in a haystack of random filler tokens.
* :class:`MQARTask` — multi-query associative recall (Zoology): key-value pairs, then
  queries that must be answered with the stored value.

Every task returns a :class:`Batch` of next-token prediction data whose ``mask`` marks the
positions where the answer is predicted; only those count in the loss and the accuracy.
A batch depends only on the ``np.random.Generator`` passed in, so a seed reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import check_choice, check_int

# The needle vocabulary: digits, hex letters, two markers and the filler "words".
DIGITS = tuple(range(10))          # 0-9
HEX = tuple(range(16))             # 0-9 then a-f as 10-15
KEY, QUERY = 16, 17                # "the pass key is" ... "what is the pass key?"
FILLER = tuple(range(18, 32))      # 14 filler words
NEEDLE_VOCAB = 32
# "the grass is green . the sky is blue . the sun is yellow ." as filler ids
PK_PATTERN = (18, 19, 20, 21, 22, 18, 23, 20, 24, 22, 18, 25, 20, 26, 22)

NEEDLE_KINDS = {
    # kind: (value alphabet, value length, haystack)
    "pk": (DIGITS, 1, "repeat"),
    "n": (DIGITS, 3, "random"),
    "w": (HEX, 4, "random"),
}


@dataclass(frozen=True)
class Batch:
    """Inputs ``(B, T)`` ints, next-token ``targets`` ``(B, T)``, ``mask`` ``(B, T)`` bool."""

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def _to_batch(seqs, answer_start):
    s = np.stack(seqs)  # (B, T + 1)
    mask = np.zeros((s.shape[0], s.shape[1] - 1), dtype=bool)
    for b, start in enumerate(answer_start):
        mask[b, start - 1:] = True  # position t predicts token t + 1
    return Batch(s[:, :-1].copy(), s[:, 1:].copy(), mask)


@dataclass(frozen=True)
class NeedleTask:
    r"""One needle, ``KEY v_1..v_k``, early in a haystack; ``QUERY`` at the end asks for it.

    The sequence (``length`` input tokens, plus the last answer token as a target)::

        filler ... KEY v_1..v_k filler ... filler QUERY v_1..v_k

    With ``placement="early"`` (evaluation) the needle starts at a uniform position in
    the first quarter, $[0, T/4)$: from $T \ge 2w$ on it lies outside a ``w``-token
    attention window seen from the question, with a margin for the short convolutions
    (kernel 4) that let a token see three more; at $T = w$ it lies inside.
    ``"anywhere"`` (training) draws it from $[0, T - 2k - 1)$, ending before the question,
    so training shows every distance. The answer is teacher-forced: the positions of
    ``QUERY, v_1..v_{k-1}`` predict $v_1..v_k$; a sequence is right when all $k$ are.
    """

    metric = "sequence"  # a sequence is right when its whole value is right

    kind: str = "pk"
    length: int = 64
    placement: str = "early"  # "early": first quarter; "anywhere": before the question

    def __post_init__(self):
        check_choice("kind", self.kind, tuple(NEEDLE_KINDS))
        check_choice("placement", self.placement, ("early", "anywhere"))
        k = NEEDLE_KINDS[self.kind][1]
        check_int("length", self.length, minimum=4 * k + 2)

    @property
    def vocab_size(self) -> int:
        return NEEDLE_VOCAB

    @property
    def answer_len(self) -> int:
        return NEEDLE_KINDS[self.kind][1]

    @property
    def chance(self) -> float:
        """Accuracy of guessing: one over the number of possible values."""
        alphabet, k, _ = NEEDLE_KINDS[self.kind]
        return float(len(alphabet)) ** -k

    def sequence(self, rng) -> tuple[np.ndarray, int, int]:
        """One sequence ``(T + 1,)``, the needle's position and the answer's first index."""
        alphabet, k, haystack = NEEDLE_KINDS[self.kind]
        T = self.length
        if haystack == "repeat":
            phase = rng.integers(len(PK_PATTERN))
            s = np.array([PK_PATTERN[(phase + i) % len(PK_PATTERN)] for i in range(T + 1)])
        else:
            s = rng.choice(FILLER, size=T + 1)
        value = rng.choice(alphabet, size=k)
        last = T // 4 if self.placement == "early" else T - 2 * k - 1
        pos = int(rng.integers(max(1, last)))
        s[pos] = KEY
        s[pos + 1:pos + 1 + k] = value
        answer = T + 1 - k
        s[answer - 1] = QUERY
        s[answer:] = value
        return s.astype(np.int64), pos, answer

    def sample(self, rng, batch_size: int) -> Batch:
        _check_rng(rng)
        check_int("batch_size", batch_size, minimum=1)
        seqs, starts = [], []
        for _ in range(batch_size):
            s, _, answer = self.sequence(rng)
            seqs.append(s)
            starts.append(answer)
        return _to_batch(seqs, starts)


@dataclass(frozen=True)
class MQARTask:
    r"""Multi-query associative recall: ``k_1 v_1 .. k_N v_N`` then queries ``k_i v_i``.

    Keys are distinct within a sequence (drawn from ``num_keys``); each query repeats a
    stored key and is followed by its value, which is the target. ``num_pairs`` defaults to
    a quarter of ``length``; queries fill the rest (a leading ``PAD`` evens it out).
    """

    metric = "token"  # each query is scored on its own

    length: int = 64
    num_pairs: int | None = None
    num_keys: int = 32
    num_values: int = 16

    def __post_init__(self):
        check_int("length", self.length, minimum=4)
        check_int("num_keys", self.num_keys, minimum=1)
        check_int("num_values", self.num_values, minimum=2)
        n = self.pairs
        if n > self.num_keys or 2 * n + 2 > self.length + 1:
            raise ValueError(f"num_pairs={n} does not fit: needs num_pairs <= num_keys="
                             f"{self.num_keys} and 2 * num_pairs + 2 <= length + 1")

    @property
    def pairs(self) -> int:
        return max(1, self.length // 4) if self.num_pairs is None else self.num_pairs

    @property
    def pad(self) -> int:
        return self.num_keys + self.num_values

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + 1

    @property
    def answer_len(self) -> int:
        return 1

    @property
    def chance(self) -> float:
        """Accuracy of guessing one query's value."""
        return 1.0 / self.num_values

    def sample(self, rng, batch_size: int) -> Batch:
        _check_rng(rng)
        check_int("batch_size", batch_size, minimum=1)
        N, T = self.pairs, self.length
        n_q = (T + 1 - 2 * N) // 2
        lead = T + 1 - 2 * N - 2 * n_q  # 0 or 1 PAD
        inputs, targets, masks = [], [], []
        for _ in range(batch_size):
            keys = rng.choice(self.num_keys, size=N, replace=False)
            values = self.num_keys + rng.integers(self.num_values, size=N)
            asked = rng.integers(N, size=n_q)
            pairs = np.stack([keys, values], axis=1).ravel()
            queries = np.stack([keys[asked], values[asked]], axis=1).ravel()
            s = np.concatenate([[self.pad] * lead, pairs, queries]).astype(np.int64)
            m = np.zeros(T, dtype=bool)
            m[lead + 2 * N::2] = True  # each query key predicts its value
            inputs.append(s[:-1])
            targets.append(s[1:])
            masks.append(m)
        return Batch(np.stack(inputs), np.stack(targets), np.stack(masks))


TASKS = ("needle-pk", "needle-n", "needle-w", "mqar")


def make_task(name: str, length: int):
    """A task by name: ``needle-pk``, ``needle-n``, ``needle-w`` or ``mqar``."""
    check_choice("task", name, TASKS)
    if name == "mqar":
        return MQARTask(length=length)
    return NeedleTask(kind=name.split("-")[1], length=length)
