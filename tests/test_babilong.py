"""BABILong in miniature: the story is what the docstring says, the answer is the last place."""

import numpy as np
import pytest

from minititans.tasks import (
    ENTITIES,
    MOVED,
    PLACES,
    STORY_FILLER,
    WHERE,
    BabilongTask,
    make_task,
)


def naive_answer(inputs):
    """Read the story as a person would: the last 'e MOVED p' of the entity asked about."""
    assert inputs[-2] == WHERE
    asked = inputs[-1]
    where = None
    for t in range(len(inputs) - 4):
        if inputs[t] == asked and inputs[t + 1] == MOVED:
            where = inputs[t + 2]
    return where


def test_babilong_hand_checked_instance():
    # seed 5, length 12, three facts, read by hand:
    #   mary MOVED office  filler  sandra MOVED bathroom  mary MOVED garden  WHERE mary
    # mary moved twice; the answer is her last place, the garden (not the office)
    mary, sandra, office, bathroom, garden = 0, 3, 7, 8, 5
    s, starts, answer = BabilongTask(length=12, num_facts=3).sequence(np.random.default_rng(5))
    assert s.tolist() == [mary, MOVED, office, 24, sandra, MOVED, bathroom, mary, MOVED,
                          garden, WHERE, mary, garden]
    assert starts.tolist() == [0, 4, 7] and answer == 12
    batch = BabilongTask(length=12, num_facts=3).sample(np.random.default_rng(5), 1)
    assert batch.mask[0].tolist() == [False] * 11 + [True]  # only "WHERE mary ->" counts
    assert batch.targets[0, -1] == garden


@pytest.mark.parametrize("placement", ["early", "anywhere"])
@pytest.mark.parametrize("length", [14, 64, 300])
def test_babilong_answer_is_recoverable_from_the_input(placement, length):
    task = BabilongTask(length=length, placement=placement)
    batch = task.sample(np.random.default_rng(1), 64)
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    answers = batch.targets[:, -1]
    assert set(answers) <= set(PLACES)
    for x, y in zip(batch.inputs, answers):
        assert naive_answer(x) == y
        assert np.sum(x == MOVED) == task.num_facts and np.sum(x == WHERE) == 1
        assert set(x) <= set(ENTITIES) | set(PLACES) | set(STORY_FILLER) | {MOVED, WHERE}
        if placement == "early":  # facts in the first quarter, or as early as they fit
            assert np.flatnonzero(x == MOVED).max() + 1 < max(length // 4, 13)
    # over 64 stories the answer is not always the first or always the last fact's place
    firsts = [x[np.flatnonzero(x == MOVED)[0] + 1] for x in batch.inputs]
    assert 0.05 < np.mean(np.array(firsts) == answers) < 0.95


def test_babilong_early_facts_are_beyond_the_window_from_4w():
    w = 16
    for mult in (4, 16):
        T = mult * w
        x = BabilongTask(length=T).sample(np.random.default_rng(2), 32).inputs
        last_place = max(np.flatnonzero(row == MOVED).max() + 1 for row in x)
        # the question (input T-1) sees j > T-1-w; every fact and 3 conv taps are older
        assert last_place + 3 < T - 1 - w


def test_babilong_is_a_function_of_the_seed():
    task = make_task("babilong", 40)
    a, b = task.sample(np.random.default_rng(7), 5), task.sample(np.random.default_rng(7), 5)
    c = task.sample(np.random.default_rng(8), 5)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert not np.array_equal(a.inputs, c.inputs)
    assert task.chance == pytest.approx(1 / 6, abs=1e-12) and task.vocab_size == 28


def test_babilong_rejects_a_story_that_does_not_fit():
    with pytest.raises(ValueError, match="length"):
        BabilongTask(length=13, num_facts=4)  # 4 facts of 3 tokens + "WHERE e" need 14
    with pytest.raises(ValueError, match="placement"):
        BabilongTask(placement="late")
