"""Multi-query associative recall (Zoology, Arora et al. 2023): pairs, then queries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._checks import check_int
from .base import Batch, check_rng


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
        check_rng(rng)
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
