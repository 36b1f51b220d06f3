"""What every task returns: a :class:`Batch` of next-token data with an answer mask.

A task is any object with ``sample(rng, batch_size) -> Batch``, ``vocab_size``, ``chance``
and ``metric`` (``"sequence"``: a sequence is right when every masked position is right;
``"token"``: each masked position is scored on its own). ``mask`` marks the positions
whose next token is an answer: only those count in the loss and the accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import check_int, check_rng


def sample_sequences(task, rng, batch_size: int) -> Batch:
    """``batch_size`` sequences of a task whose ``sequence(rng)`` returns ``(tokens (T + 1,),
    anything, answer start)``: the answer is every token from its start on."""
    check_rng(rng)
    check_int("batch_size", batch_size, minimum=1)
    seqs, starts = [], []
    for _ in range(batch_size):
        s, _, answer = task.sequence(rng)
        seqs.append(s)
        starts.append(answer)
    return to_batch(seqs, starts)

@dataclass(frozen=True)
class Batch:
    """Inputs ``(B, T)`` ints, next-token ``targets`` ``(B, T)``, ``mask`` ``(B, T)`` bool."""

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


def to_batch(seqs, answer_start):
    s = np.stack(seqs)  # (B, T + 1)
    mask = np.zeros((s.shape[0], s.shape[1] - 1), dtype=bool)
    for b, start in enumerate(answer_start):
        mask[b, start - 1:] = True  # position t predicts token t + 1
    return Batch(s[:, :-1].copy(), s[:, 1:].copy(), mask)




@dataclass(frozen=True)
class MixedLengths:
    """A task drawn at one of several lengths per batch: ``make(length)`` for each length.

    Training on a mix of lengths shows the memory's gates distances longer than one
    training length (the length-generalisation recipe of the needle experiment). The
    length of each batch is drawn uniformly from ``lengths`` with the batch's own ``rng``,
    so a batch still depends only on the generator passed in.
    """

    tasks: tuple  # one task per length, all with the same vocabulary and metric

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks must hold at least one task")
        if len({t.vocab_size for t in self.tasks}) != 1:
            raise ValueError("tasks must share one vocab_size")

    @property
    def vocab_size(self) -> int:
        return self.tasks[0].vocab_size

    @property
    def metric(self) -> str:
        return self.tasks[0].metric

    @property
    def chance(self) -> float:
        return self.tasks[0].chance

    def sample(self, rng, batch_size: int) -> Batch:
        check_rng(rng)
        return self.tasks[int(rng.integers(len(self.tasks)))].sample(rng, batch_size)
