"""bench/readme_table.py: docs/performance.md's numbers are printed from one results file, ratios within one run."""

import importlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_table_module():
    return importlib.import_module("bench.readme_table")  # bench/ is a package: `python -m bench.readme_table`


def run(latency: float, by_batch: dict, **extra) -> dict:
    return {"latency_s": {"median": latency, "p95": latency * 1.1}, "render_by_batch": by_batch} | extra


def test_ratios_compare_the_compiled_engine_with_the_expert_of_the_same_file():
    table = load_table_module()
    results = {
        "expert": run(0.25, {"4": {"render_s": 0.6, "images_per_s": 6.67, "images_per_s_with_png": 6.0}}),
        "engine-compile": run(
            0.2,
            {"4": {"render_s": 0.5, "images_per_s": 8.0}},
            throughput={"images_per_s": 7.5},
            peak_memory_gib_batch4=3.3,
            cold_start_s=58.0,
            part=2,
        ),
        "naive": {"skipped": "not started: too little of the run's time left"},
        "engine-compile-artifacts": {"cold_start_s": 41.04, "first_request_s": 0.31, "part": 1},
        "engine-compile-fp8": {"started_s_into_part": 13, "not_ready_after_s": 580},
    }
    lines = table.main_table(results)
    assert lines[0] == (
        "| | expert diffusers recipe | engine, `PUNKS_COMPILE=true` | engine compiled, cold boot from the "
        "compile-artifacts file | engine compiled, `PUNKS_FP8=true` (opt-in, not exact) | engine compiled vs expert |"
    )
    assert "| cold start (process start to ready) |  | 58.0 s | 41.0 s | not ready after 580 s (killed) |  |" in lines
    assert "| its first request after ready |  |  | 0.310 s |  |  |" in lines
    assert "| measured in part |  | 2 | 1 |  |  |" in lines  # each column says which part of the run measured it
    latency_row = next(line for line in lines if line.startswith("| end to end"))
    assert "0.250 / 0.275 s" in latency_row and latency_row.endswith("| 1.25x |")  # expert time / engine time
    batch4 = next(line for line in lines if line.startswith("| render alone, batch 4"))
    assert batch4.endswith("| 1.20x |")  # 8.0 / 6.67 images/s
    clients = next(line for line in lines if line.startswith("| throughput"))
    assert "(6.00 images/s: batch 4 + PNGs, no server)" in clients and clients.endswith("| 1.25x |")
    assert all("naive" not in line for line in lines)  # a skipped variant gets no column


def test_the_committed_h200_file_prints(capsys, monkeypatch):
    table = load_table_module()
    path = REPO / "bench" / "results" / "2026-12-02-NVIDIA-H200.json"
    monkeypatch.setattr("sys.argv", ["readme_table.py", str(path)])
    table.main()
    printed = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert printed.startswith("NVIDIA H200, driver 580.159.04, torch 2.11.0+cu130")
    for variant in ("engine", "engine-compile"):
        assert f"{report['results'][variant]['throughput']['images_per_s']:.2f} images/s" in printed
    where = report["results"]["engine-compile"]["where_batch1_goes"]
    assert f"| text_encoder_ms | {where['text_encoder_ms']} |" in printed
    parts = report["parts"]  # a run resumed in several parts names each
    assert f"Command {len(parts)} of {len(parts)} (GPU {parts[-1]['gpu_uuid']}" in printed


def test_levers_of_their_own_process_get_rows_with_their_largest_batch():
    table = load_table_module()
    engine = run(0.2, {"4": {"render_s": 0.5, "images_per_s": 8.0}}, throughput={"images_per_s": 7.5}, part=7)
    engine["levers"] = {"gc_freeze": {"latency_s": {"median": 0.19, "p95": 0.2}}}
    batch8 = run(
        0.21,
        {"4": {"render_s": 0.5, "images_per_s": 8.0}, "8": {"render_s": 0.9, "images_per_s": 8.89}},
        throughput={"images_per_s": 8.1, "gpu_thread_busy": 0.99},
        part=4,
    )
    tuned = {"error": "x"}
    killed = {"started_s_into_part": 12.2, "not_ready_after_s": 583}
    results = {
        "engine-compile": engine,
        "engine-compile-batch8": batch8,
        "engine-compile-inductor-tuned": tuned,
        "engine-compile-inductor-tuned-part-5": killed,
        "engine-compile-snap-threads": killed,
    }
    lines = table.levers_table(engine, results)
    none = "| none (engine-compile as run) | 0.200 / 0.220 s | batch 4: 0.500 s (8.00/s) | 7.50 images/s |  | 7 |"
    assert none in lines
    assert "| gc_freeze (same process) | 0.190 / 0.200 s |  |  |  | 7 |" in lines  # measured in the engine's part
    assert (
        "| batch buckets up to 8, max_batch_size 8 (own process) | 0.210 / 0.231 s | batch 8: 0.900 s (8.89/s) "
        "| 8.10 images/s | 0.99 | 4 |"
    ) in lines
    assert f"| {table.LEVER_VARIANTS['engine-compile-inductor-tuned']} |  |  | x |  |  |" in lines
    part_5 = table.LEVER_VARIANTS["engine-compile-inductor-tuned-part-5"]
    assert f"| {part_5} |  |  | not ready after 583 s (killed) |  |  |" in lines
    assert (
        "| snapping on the server's threads, PUNKS_SNAP_PROCESSES=0 (own process) |  |  | not ready after 583 s "
        "(killed) |  |  |"
    ) in lines


def test_docs_performance_shows_the_committed_h200_table():
    """docs/performance.md carries the main table exactly as the committed file prints it."""
    table = load_table_module()
    report = json.loads((REPO / "bench" / "results" / "2026-12-02-NVIDIA-H200.json").read_text())
    page = (REPO / "docs" / "performance.md").read_text()
    missing = [line for line in table.main_table(report["results"]) if line not in page]
    assert missing == [], "docs/performance.md is stale: paste `python bench/readme_table.py` output"
