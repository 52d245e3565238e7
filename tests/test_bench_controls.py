"""bench/controls.py's CPU part on two portraits: every case is timed and summarised (no time is asserted: the
numbers are the benchmark's, in bench/results/)."""

from bench.controls import cpu_costs, summary

CASES = {
    *("background_mask", "palette_pico8", "palette_game_boy", "palette_pico8_transparent"),
    *("snap_without_controls", "snap_pico8_transparent"),
}


def test_every_case_is_timed_and_summarised():
    costs = cpu_costs(count=2, repeats=1)
    assert set(costs) == CASES
    for case in costs.values():
        assert set(case) == {"median_ms", "mean_ms", "p95_ms", "max_ms"}
        assert 0 < case["median_ms"] <= case["max_ms"] and case["p95_ms"] <= case["max_ms"]


def test_summary_orders_the_values():
    assert summary([3.0, 1.0, 2.0]) == {"median_ms": 2.0, "mean_ms": 2.0, "p95_ms": 2.0, "max_ms": 3.0}
