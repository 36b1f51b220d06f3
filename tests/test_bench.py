"""``minititans bench`` reports on a busy machine that it was busy (no timing is asserted)."""

from minititans.bench import format_table, goals, machine_noise


def _result(loads, local_peak):
    result = dict(machine=dict(cpu="x", cores=2, python="3", numpy="2", numba="0",
                               load_average_start_end=loads),
                  peak_gflops=dict(float32=100.0, float64=50.0),
                  rows=[dict(kernel="memory_scan", config="d=64 h=256 depth=2 chunk=1",
                             dtype="float32", tokens_per_s=1e4, gflops=10.0,
                             local_peak_gflops=local_peak, peak_fraction=10.0 / local_peak)])
    result["goals"] = goals(result)
    return result


def test_a_quiet_run_is_called_quiet():
    noise = machine_noise(_result([0.1, 0.4], 95.0))
    assert noise["busy"] is False and noise["max_load"] == 0.4
    assert abs(noise["min_peak_ratio"] - 0.95) < 1e-12
    table = format_table(_result([0.1, 0.4], 95.0))
    assert "Machine: quiet" in table and "(busy machine)" not in table


def test_a_high_load_average_marks_the_run_busy_and_its_missed_goals():
    # load 1.5 on 2 cores is past half the cores; the peak itself held up
    result = _result([1.5, 0.2], 99.0)
    assert machine_noise(result)["busy"] is True
    table = format_table(result)
    assert "Machine: BUSY (load average up to 1.50 on 2 cores" in table
    # the per-token goal (>= 25% of peak) is missed at 10%: said to be under load
    assert "| **no** (busy machine) |" in table


def test_a_drop_of_the_matmul_peak_during_the_run_marks_it_busy():
    # quiet load averages, but the peak measured after a row fell to 60% of the start
    result = _result([0.1, 0.1], 60.0)
    noise = machine_noise(result)
    assert noise["busy"] is True and abs(noise["min_peak_ratio"] - 0.6) < 1e-12
    assert "fell to 60% of its start" in noise["text"]


def test_the_first_call_row_times_two_scans_in_a_fresh_process():
    # its problem must be one the memory can take: it once diverged (unnormalised keys),
    # and the row reported the error instead of a time
    import numpy as np

    from minititans.bench.kernels import first_call_row

    row = first_call_row(np.float32)
    assert row["kernel"].startswith("first call (new process") and "note" not in row
    assert 0 < row["seconds"] < 120 and 0 < row["import_seconds"] < 120
