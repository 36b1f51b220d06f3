r"""Synthetic tasks with a seed and a controllable length (Titans Section 5, in miniature).

* :class:`NeedleTask` — single needle in a haystack, the paper's S-NIAH (Table 2):
  ``"pk"`` a one-digit passkey in a repetitive haystack, ``"n"`` a 3-digit number and
  ``"w"`` a 4-symbol UUID-like hex value, both in a haystack of random filler tokens.
* :class:`MQARTask` — multi-query associative recall (Zoology): key-value pairs, then
  queries that must be answered with the stored value.
* :class:`BabilongTask` — BABILong in miniature: bAbI-qa1 facts "entity moved place" in
  filler, then "where entity?"; the answer is the entity's last place.

Every task returns a :class:`Batch` of next-token prediction data whose ``mask`` marks the
positions where the answer is predicted; only those count in the loss and the accuracy.
A batch depends only on the ``np.random.Generator`` passed in, so a seed reproduces it.
"""

from .._checks import check_choice
from .babilong import (
    BABILONG_VOCAB,
    ENTITIES,
    MOVED,
    PLACES,
    STORY_FILLER,
    WHERE,
    BabilongTask,
)
from .base import Batch, MixedLengths, check_rng, to_batch
from .mqar import MQARTask
from .needle import FILLER, KEY, NEEDLE_KINDS, NEEDLE_VOCAB, PK_PATTERN, QUERY, NeedleTask

# task name -> a task of a given length (the names `minititans train --task` accepts)
FACTORIES = {
    "needle-pk": lambda length: NeedleTask(kind="pk", length=length),
    "needle-n": lambda length: NeedleTask(kind="n", length=length),
    "needle-w": lambda length: NeedleTask(kind="w", length=length),
    "mqar": lambda length: MQARTask(length=length),
    "babilong": lambda length: BabilongTask(length=length),
}
TASKS = tuple(FACTORIES)


def make_task(name: str, length: int):
    """A task by name (one of :data:`TASKS`) at a given sequence length."""
    check_choice("task", name, TASKS)
    return FACTORIES[name](length)


__all__ = ["BABILONG_VOCAB", "ENTITIES", "FACTORIES", "FILLER", "KEY", "MOVED", "MQARTask",
           "NEEDLE_KINDS", "NEEDLE_VOCAB", "PLACES", "STORY_FILLER", "WHERE", "BabilongTask",
           "Batch", "MixedLengths", "NeedleTask", "PK_PATTERN", "QUERY", "TASKS", "check_rng",
           "make_task", "to_batch"]
