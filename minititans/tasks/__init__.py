r"""Synthetic tasks with a seed and a controllable length (Titans Section 5, in miniature).

* :class:`NeedleTask` — single needle in a haystack, the paper's S-NIAH (Table 2):
  ``"pk"`` a one-digit passkey in a repetitive haystack, ``"n"`` a 3-digit number and
  ``"w"`` a 4-symbol UUID-like hex value, both in a haystack of random filler tokens.
* :class:`MQARTask` — multi-query associative recall (Zoology): key-value pairs, then
  queries that must be answered with the stored value.
* :class:`CorpusTask` — real text: next-character prediction on the running Python's own
  documentation and sources (:func:`python_corpus`) or a user's file (:func:`load_text_file`).
* The six MAD tasks (:mod:`.mad`, Poli et al. 2024): in-context recall, fuzzy and noisy
  in-context recall, selective copying, compression and memorization.
* :class:`BabilongTask` — BABILong in miniature: bAbI-qa1 facts "entity moved place" in
  filler, then "where entity?"; the answer is the entity's last place.

Every task returns a :class:`Batch` of next-token prediction data whose ``mask`` marks the
positions where the answer is predicted; only those count in the loss and the accuracy.
A batch depends only on the ``np.random.Generator`` passed in, so a seed reproduces it.
"""

from functools import lru_cache

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
from .corpus import STDLIB_MODULES, Corpus, CorpusTask, load_text_file, python_corpus
from .mad import (
    MAD_TASKS,
    CompressionTask,
    FuzzyInContextRecallTask,
    InContextRecallTask,
    MemorizationTask,
    NoisyInContextRecallTask,
    SelectiveCopyingTask,
)
from .mqar import MQARTask
from .needle import FILLER, KEY, NEEDLE_KINDS, NEEDLE_VOCAB, PK_PATTERN, QUERY, NeedleTask

# task name -> a task of a given length (the names `minititans train --task` accepts)
FACTORIES = {
    "needle-pk": lambda length: NeedleTask(kind="pk", length=length),
    "needle-n": lambda length: NeedleTask(kind="n", length=length),
    "needle-w": lambda length: NeedleTask(kind="w", length=length),
    "mqar": lambda length: MQARTask(length=length),
    "python-docs": lambda length: CorpusTask(_python_corpus(), length),
    # MAD (their other settings at MAD's defaults; compression needs a bottleneck decoder)
    "in_context_recall": lambda length: InContextRecallTask(length=length),
    "fuzzy_in_context_recall": lambda length: FuzzyInContextRecallTask(length=length),
    "noisy_in_context_recall": lambda length: NoisyInContextRecallTask(length=length),
    "selective_copying": lambda length: SelectiveCopyingTask(length=length),
    "compression": lambda length: CompressionTask(length=length),
    "memorization": lambda length: MemorizationTask(length=length),
    "babilong": lambda length: BabilongTask(length=length),
}
TASKS = tuple(FACTORIES)


@lru_cache(maxsize=1)
def _python_corpus():
    return python_corpus()


def make_task(name: str, length: int):
    """A task by name (one of :data:`TASKS`) at a given sequence length."""
    check_choice("task", name, TASKS)
    return FACTORIES[name](length)


__all__ = ["BABILONG_VOCAB", "ENTITIES", "FACTORIES", "FILLER", "KEY", "MAD_TASKS", "MOVED",
           "NEEDLE_KINDS", "NEEDLE_VOCAB", "PK_PATTERN", "PLACES", "QUERY", "STDLIB_MODULES",
           "STORY_FILLER", "TASKS", "WHERE", "BabilongTask", "Batch", "CompressionTask", "Corpus",
           "CorpusTask", "FuzzyInContextRecallTask", "InContextRecallTask", "MQARTask",
           "MemorizationTask", "MixedLengths", "NeedleTask", "NoisyInContextRecallTask",
           "SelectiveCopyingTask", "check_rng", "load_text_file", "make_task", "python_corpus",
           "to_batch"]
