r"""BABILong in miniature: bAbI task 1 ("single supporting fact") hidden in a long haystack.

BABILong (Kuratov et al., 2024; Titans Section 5.4, Figure 6) hides the facts of a bAbI
story in book text and asks a question at the end. Here a story is ``num_facts`` facts
"entity moved place" (three tokens each) among random filler words, and the question
"where entity" asks for the place the entity moved to *last*::

    filler .. mary MOVED garden filler .. john MOVED hall .. mary MOVED kitchen filler ..
    .. filler WHERE mary -> kitchen

The answer needs both the binding entity -> place and its recency (a later move of the
same entity overrides an earlier one): exactly what a memory that overwrites a key's value
(the delta rule, Titans' surprise update) does, and what an additive one (linear attention)
does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import check_choice, check_int
from .base import Batch, sample_sequences

# The story vocabulary: entities, places, two markers and the filler words.
ENTITIES = tuple(range(4))            # mary, john, daniel, sandra
PLACES = tuple(range(4, 10))          # kitchen, garden, hall, office, bathroom, bedroom
MOVED, WHERE = 10, 11                 # "... moved to the ..." and "where is ... ?"
STORY_FILLER = tuple(range(12, 28))   # 16 filler words
BABILONG_VOCAB = 28
FACT_LEN = 3                          # entity MOVED place


@dataclass(frozen=True)
class BabilongTask:
    r"""``num_facts`` facts ``entity MOVED place`` in filler; ``WHERE entity`` -> last place.

    The sequence (``length`` input tokens, plus the answer as the last target)::

        filler .. e_1 MOVED p_1 .. e_F MOVED p_F .. filler WHERE e -> p

    Entities and places are drawn uniformly with replacement, so an entity may move several
    times; the asked entity is the one of a uniformly chosen fact, and the answer is the
    place of its last fact. With ``placement="early"`` (evaluation) the facts lie in the
    first quarter of the sequence, or as early as they fit ($[0, \max(T/4, 3F + 1))$), so
    from $T \ge 4w$ on every fact is beyond a ``w``-token window seen from the question;
    ``"anywhere"`` (training) spreads them over everything before the question. Only the
    answer position counts; chance is one over the number of places.
    """

    metric = "sequence"

    length: int = 64
    num_facts: int = 4
    placement: str = "early"  # "early": first quarter; "anywhere": before the question

    def __post_init__(self):
        check_int("num_facts", self.num_facts, minimum=1)
        check_choice("placement", self.placement, ("early", "anywhere"))
        check_int("length", self.length, minimum=FACT_LEN * self.num_facts + 2)

    @property
    def vocab_size(self) -> int:
        return BABILONG_VOCAB

    @property
    def answer_len(self) -> int:
        return 1

    @property
    def chance(self) -> float:
        """Accuracy of guessing a place uniformly."""
        return 1.0 / len(PLACES)

    def sequence(self, rng) -> tuple[np.ndarray, np.ndarray, int]:
        """One sequence ``(T + 1,)``, the facts' start positions ``(F,)`` and the answer index."""
        T, F = self.length, self.num_facts
        s = rng.choice(STORY_FILLER, size=T + 1)
        # the inputs end "... WHERE e"; the target of the last input is the place
        where, asked_at, answer = T - 2, T - 1, T
        region = where if self.placement == "anywhere" else max(T // 4, FACT_LEN * F + 1)
        region = min(region, where)
        # F non-overlapping facts in [0, region): sorted distinct u_i, start_i = u_i + 2 i
        u = np.sort(rng.choice(region - (FACT_LEN - 1) * F, size=F, replace=False))
        starts = u + (FACT_LEN - 1) * np.arange(F)
        entities = rng.choice(ENTITIES, size=F)
        places = rng.choice(PLACES, size=F)
        for i, t in enumerate(starts):
            s[t:t + FACT_LEN] = (entities[i], MOVED, places[i])
        e = entities[rng.integers(F)]
        last = np.flatnonzero(entities == e)[-1]
        s[where], s[asked_at], s[answer] = WHERE, e, places[last]
        return s.astype(np.int64), starts, answer

    def sample(self, rng, batch_size: int) -> Batch:
        return sample_sequences(self, rng, batch_size)
