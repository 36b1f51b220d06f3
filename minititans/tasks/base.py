"""What every task returns: a :class:`Batch` of next-token data with an answer mask.

A task is any object with ``sample(rng, batch_size) -> Batch``, ``vocab_size``, ``chance``
and ``metric`` (``"sequence"``: a sequence is right when every masked position is right;
``"token"``: each masked position is scored on its own). ``mask`` marks the positions
whose next token is an answer: only those count in the loss and the accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import check_rng  # noqa: F401  (the tasks' samplers import it from here)


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


