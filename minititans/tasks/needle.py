r"""Single needle in a haystack, the paper's S-NIAH (Titans Table 2), in miniature.

``"pk"`` a one-digit passkey in a repetitive haystack, ``"n"`` a 3-digit number and ``"w"``
a 4-symbol UUID-like hex value, both in a haystack of random filler tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import check_choice, check_int
from .base import Batch, sample_sequences

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
        return sample_sequences(self, rng, batch_size)
