"""The recall tables come with a one-line reading, said only where the numbers show it."""

from minititans.experiments.recall import LEAST_SQUARES, format_recall_table, reading


def _result(errors, passes):
    sizes = [4, 32]
    rows = [{"memory": m, "n_pairs": n, "passes": passes, "error": e}
            for m, errs in errors.items() for n, e in zip(sizes, errs)]
    return {"d": 16, "sizes": sizes, "passes": [passes], "seed": 0, "rows": rows}


def test_one_pass_reading_explains_momentum_only_when_titans_trails():
    trails = _result({"Titans linear": [0.53, 0.7], "delta rule": [0.05, 1.0],
                      LEAST_SQUARES: [0.0, 0.5]}, 1)
    (line,) = reading(trails, 1)
    assert "Titans linear (0.53 at N=4) trails the delta rule (0.05)" in line
    assert "tutorial/04-momentum-forgetting" in line
    level = _result({"Titans linear": [0.06, 0.7], "delta rule": [0.05, 1.0],
                     LEAST_SQUARES: [0.0, 0.5]}, 1)
    assert reading(level, 1) == []


def test_many_passes_reading_predicts_linear_attention_error_and_names_the_deep_gain():
    r = _result({"linear attention": [213.4, 615.0], "Titans deep": [0.0, 0.30],
                 LEAST_SQUARES: [0.0, 0.498]}, 16)
    lines = reading(r, 16)
    assert any("(16 - 1)^2 = 225 at N=4 (measured 213)" in x for x in lines)
    assert any("better than the best matrix can (N = 32)" in x for x in lines)
    # a deep memory above the floor gets no such line
    r = _result({"linear attention": [0.1, 0.9], "Titans deep": [0.0, 0.6],
                 LEAST_SQUARES: [0.0, 0.498]}, 16)
    assert reading(r, 16) == []
    assert "Reading" not in format_recall_table(r)
