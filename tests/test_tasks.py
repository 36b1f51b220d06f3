"""Task generators: answers right by construction, reproducible by seed, lengths as asked."""

import numpy as np
import pytest

from minititans.tasks import (
    FILLER,
    KEY,
    NEEDLE_KINDS,
    PK_PATTERN,
    QUERY,
    MQARTask,
    NeedleTask,
    make_task,
)


@pytest.mark.parametrize("kind", list(NEEDLE_KINDS))
@pytest.mark.parametrize("placement", ["early", "anywhere"])
def test_needle_answer_is_the_value_after_the_key(kind, placement):
    task = NeedleTask(kind, 40, placement)
    k = task.answer_len
    batch = task.sample(np.random.default_rng(0), 32)
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (32, 40)
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # shifted
    for x, y, m in zip(batch.inputs, batch.targets, batch.mask):
        full = np.concatenate([x, y[-1:]])
        (key_pos,) = np.flatnonzero(full == KEY)
        value = full[key_pos + 1:key_pos + 1 + k]
        assert np.flatnonzero(m).tolist() == list(range(40 - k, 40))
        assert x[40 - k] == QUERY
        np.testing.assert_array_equal(y[m], value)  # the targets are the needle's value
        assert set(value) <= set(NEEDLE_KINDS[kind][0])
        assert np.sum(full == QUERY) == 1
        if placement == "early":
            assert key_pos < 40 // 4


def test_needle_early_placement_is_beyond_the_window_from_2w():
    w = 16
    for mult in (2, 4, 8):
        batch = NeedleTask("pk", mult * w).sample(np.random.default_rng(1), 64)
        T = mult * w
        key_pos = np.argmax(batch.inputs == KEY, axis=1)
        # the question (position T-1) sees j > T-1-w; the value and 3 conv taps are older
        assert np.all(key_pos + 1 + 3 < T - w)


def test_pk_haystack_repeats_and_n_haystack_is_random_filler():
    pk = NeedleTask("pk", 60).sample(np.random.default_rng(2), 4).inputs
    P = len(PK_PATTERN)
    for row in pk:
        filler = [i for i, t in enumerate(row) if t in FILLER]
        phases = [ph for ph in range(P)
                  if all(row[i] == PK_PATTERN[(ph + i) % P] for i in filler)]
        assert len(phases) == 1  # one cyclic pattern, shifted, around the needle
    n = NeedleTask("n", 200).sample(np.random.default_rng(3), 2).inputs
    assert len(set(n[0]) & set(FILLER)) == len(FILLER)


def test_tasks_are_reproducible_by_seed():
    for task in (NeedleTask("w", 30), MQARTask(40)):
        a = task.sample(np.random.default_rng(7), 5)
        b = task.sample(np.random.default_rng(7), 5)
        c = task.sample(np.random.default_rng(8), 5)
        np.testing.assert_array_equal(a.inputs, b.inputs)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert not np.array_equal(a.inputs, c.inputs)


@pytest.mark.parametrize("length", [9, 32, 63])
def test_mqar_answers_are_the_stored_values(length):
    task = MQARTask(length)
    batch = task.sample(np.random.default_rng(0), 16)
    assert batch.inputs.shape == (16, length)
    for x, y, m in zip(batch.inputs, batch.targets, batch.mask):
        full = np.concatenate([x, y[-1:]])
        start = int(full[0] == task.pad)
        pairs = full[start:start + 2 * task.pairs].reshape(-1, 2)
        table = dict(pairs.tolist())
        assert len(table) == task.pairs  # distinct keys
        assert m.sum() == (length + 1 - 2 * task.pairs) // 2
        for t in np.flatnonzero(m):
            assert y[t] == table[x[t]]
            assert task.num_keys <= y[t] < task.num_keys + task.num_values


def test_chance_and_vocabulary():
    assert NeedleTask("pk", 32).chance == pytest.approx(0.1)
    assert NeedleTask("n", 32).chance == pytest.approx(1e-3)
    assert NeedleTask("w", 32).chance == pytest.approx(16.0 ** -4)
    assert MQARTask(32).chance == pytest.approx(1 / 16)
    assert make_task("mqar", 32).vocab_size == 32 + 16 + 1
    with pytest.raises(ValueError, match="task"):
        make_task("babi", 32)
    with pytest.raises(ValueError, match="length"):
        NeedleTask("w", 10)


def test_mixed_lengths_draws_one_length_per_batch_from_the_batch_rng():
    from minititans.tasks import MixedLengths

    tasks = tuple(NeedleTask("n", n, "anywhere") for n in (16, 32, 64))
    mixed = MixedLengths(tasks)
    seen = []
    for seed in range(30):
        batch = mixed.sample(np.random.default_rng(seed), 3)
        # the same generator, read by hand: first the length index, then that task's batch
        rng = np.random.default_rng(seed)
        want = tasks[int(rng.integers(3))].sample(rng, 3)
        np.testing.assert_array_equal(batch.inputs, want.inputs)
        np.testing.assert_array_equal(batch.targets, want.targets)
        seen.append(batch.inputs.shape[1])
    assert set(seen) == {16, 32, 64}
    assert mixed.vocab_size == 32 and mixed.metric == "sequence" and mixed.chance == 0.001
    with pytest.raises(ValueError, match="vocab_size"):
        MixedLengths((NeedleTask("n", 16), MQARTask(length=16)))
