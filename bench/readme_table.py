"""Print the tables of docs/performance.md from one bench/bench.py results file, so the docs say what the
committed file says and nothing else.

    python -m bench.readme_table bench/results/2026-12-02-NVIDIA-H200.json

Ratios compare the engine with the expert recipe measured in the same run (never across GPUs or runs).
"""

import argparse
import json
from pathlib import Path

COLUMNS = {  # results key -> column title
    "naive": "naive diffusers",
    "expert": "expert diffusers recipe",
    "engine": "engine, eager",
    "engine-compile": "engine, `PUNKS_COMPILE=true`",
    "engine-compile-artifacts": "engine compiled, cold boot from the compile-artifacts file",
    "engine-compile-fp8": "engine compiled, `PUNKS_FP8=true` (opt-in, not exact)",
    "engine-compile-fp8-bucket4": "engine compiled, `PUNKS_FP8=true`, one bucket of 4 (opt-in, not exact)",
}
LEVER_VARIANTS = {  # results key -> lever row title (a lever that needs its own process)
    "engine-compile-batch8": "batch buckets up to 8, max_batch_size 8 (own process)",
    "engine-compile-inductor-tuned": "Inductor flags of diffusers' guide, 2nd of 2 tries back to back (own process)",
    "engine-compile-inductor-tuned-part-5": "Inductor flags of diffusers' guide, part 5 (own process)",
    "engine-compile-snap-processes": "snapping in 4 worker processes, PUNKS_SNAP_PROCESSES=4 (own process)",
    "engine-compile-snap-threads": "snapping on the server's threads, PUNKS_SNAP_PROCESSES=0 (own process)",
    "engine-compile-snaps-always-in-workers": "every snap in a worker process, a lone one too (own process)",
    "engine-compile-snap-processes-part-4": "snapping in 4 worker processes, diffusers' render path (own process)",
    "engine-compile-snap-threads-part-1": "snapping on threads, diffusers' render path (own process)",
    "engine-compile-part-7": "batcher waiting 10 ms for company, eager text encoder, PNG level 6 (own process)",
    "engine-compile-part-9": "batcher wait 0, eager text encoder, PNG level 6 (own process)",
}


def part(result: dict) -> str:
    """Which part of a resumed run (bench.py --resume; the report's `parts`) measured a result."""
    return str(result.get("part", ""))


def seconds(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f} s"


def median_p95(numbers: dict | None) -> str:
    """'p50 / p95 s' of a percentiles dict (bench.py's `percentiles`); empty when it was not measured."""
    return f"{numbers['median']:.3f} / {numbers['p95']:.3f} s" if numbers and "median" in numbers else ""


def latency(result: dict) -> str:
    return median_p95(result.get("latency_s"))


def http_latency(result: dict) -> str:
    return median_p95(result.get("http_latency", {}).get("request_s"))


def latency_split(result: dict) -> str:
    parts = result.get("latency_parts_ms")
    return " / ".join(f"{parts[name]:.1f}" for name in ("pipeline", "postprocess", "png")) + " ms" if parts else ""


def by_batch(result: dict, size: int) -> str:
    row = result.get("render_by_batch", {}).get(str(size))
    return f"{row['render_s']:.3f} s ({row['images_per_s']:.2f}/s)" if row else ""


def clients(name: str, result: dict) -> str:
    if name == "expert":  # no server: its batch-4 rate with PNGs, as if requests batched perfectly for free
        row = result.get("render_by_batch", {}).get("4")
        return f"({row['images_per_s_with_png']:.2f} images/s: batch 4 + PNGs, no server)" if row else ""
    numbers = result.get("throughput", {})
    return f"{numbers['images_per_s']:.2f} images/s" if "images_per_s" in numbers else ""


def cold_start(name: str, result: dict) -> str:
    if "not_ready_after_s" in result:  # a worker killed by the run's time limit before it was ready
        return f"not ready after {result['not_ready_after_s']:.0f} s (killed)"
    return seconds(result.get("cold_start_s"), 1)


def ratio(engine: float | None, expert: float | None, higher_is_better: bool) -> str:
    if not engine or not expert:
        return ""
    return f"{(engine / expert if higher_is_better else expert / engine):.2f}x"


def main_table(results: dict) -> list[str]:
    present = [name for name in COLUMNS if name in results and "skipped" not in results[name]]
    rows = [
        ("end to end p50 / p95, batch 1 (prompt in, 1024 PNG out)", lambda n, r: latency(r)),
        ("its split: render / snap + upscale / PNG (medians)", lambda n, r: latency_split(r)),
        ("the same through the API, one client", lambda n, r: http_latency(r)),
        *((f"render alone, batch {size} (images/s)", lambda n, r, size=size: by_batch(r, size)) for size in (1, 2, 4)),
        ("throughput, 8 concurrent clients through the API", clients),
        (
            "peak GPU memory, batch 4",
            lambda n, r: f"{r['peak_memory_gib_batch4']:.2f} GiB" if r.get("peak_memory_gib_batch4") else "",
        ),
        ("cold start (process start to ready)", cold_start),
        ("its first request after ready", lambda n, r: seconds(r.get("first_request_s"))),
        ("measured in part", lambda n, r: part(r)),
    ]
    lines = [
        "| | " + " | ".join(COLUMNS[name] for name in present) + " | engine compiled vs expert |",
        "| --- |" + " --- |" * (len(present) + 1),
    ]
    expert, engine = results.get("expert", {}), results.get("engine-compile", {})
    comparisons = [
        ratio(engine.get("latency_s", {}).get("median"), expert.get("latency_s", {}).get("median"), False),
        "",
        "",
        *(
            ratio(
                engine.get("render_by_batch", {}).get(str(size), {}).get("images_per_s"),
                expert.get("render_by_batch", {}).get(str(size), {}).get("images_per_s"),
                True,
            )
            for size in (1, 2, 4)
        ),
        ratio(
            engine.get("throughput", {}).get("images_per_s"),
            expert.get("render_by_batch", {}).get("4", {}).get("images_per_s_with_png"),
            True,
        ),
        "",
        "",
        "",
        "",
    ]
    for (title, cell), comparison in zip(rows, comparisons, strict=True):
        lines.append(f"| {title} | " + " | ".join(cell(n, results[n]) for n in present) + f" | {comparison} |")
    return lines


def largest_render(result: dict) -> str:
    """The render of the largest batch size measured, e.g. `batch 8: 1.010 s (7.92/s)`."""
    sizes = sorted(result.get("render_by_batch", {}), key=int)
    return f"batch {sizes[-1]}: {by_batch(result, int(sizes[-1]))}" if sizes else ""


def levers_table(engine: dict, results: dict | None = None) -> list[str]:
    """Where a batch-1 request's time goes, then every lever: those measured in the engine's process and the
    lever variants of `results` that needed a process of their own."""
    where = engine.get("where_batch1_goes", {})
    levers = engine.get("levers", {})
    lines = ["| where a batch-1 request's time goes | measured |", "| --- | --- |"]
    for key, value in where.items():
        lines.append(f"| {key} | {value} |")
    lines += [
        "",
        "| lever (one at a time) | batch-1 p50 / p95 | render, largest batch | 8 clients | GPU thread busy | part |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    measured_in = part(engine)
    rows = [("none (engine-compile as run)", engine, measured_in)]
    rows += [(f"{name} (same process)", lever, measured_in) for name, lever in levers.items()]
    own_process = {key: (results or {})[key] for key in LEVER_VARIANTS if key in (results or {})}
    rows += [(LEVER_VARIANTS[key], lever, part(lever)) for key, lever in own_process.items()]
    for name, lever, measured_in in rows:
        load = lever.get("throughput", {})
        rate = f"{load['images_per_s']:.2f} images/s" if "images_per_s" in load else lever.get("error", "")[:80]
        if "not_ready_after_s" in lever:
            rate = cold_start(name, lever)
        busy = load.get("gpu_thread_busy", "")
        lines.append(f"| {name} | {latency(lever)} | {largest_render(lever)} | {rate} | {busy} | {measured_in} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    report = json.loads(parser.parse_args().results.read_text())
    env = report["environment"]
    print(
        f"{env['gpu']}, driver {env.get('driver', '')}, torch {env['torch']}, diffusers {env['diffusers']}, "
        f"transformers {env['transformers']}, {env['date']}; {report['model']}, {report['steps']} steps."
    )
    parts = report.get("parts") or [{"command": report.get("command", "")}]
    for number, step in enumerate(parts, 1):
        where = f" (GPU {step['gpu_uuid']})" if "gpu_uuid" in step else ""
        print(f"Command{f' {number} of {len(parts)}' if len(parts) > 1 else ''}{where}: `{step['command']}`")
    print()
    print("\n".join(main_table(report["results"])))
    for variant in ("engine-compile", "engine"):  # the compiled engine's breakdown, else the eager one's
        if "where_batch1_goes" in report["results"].get(variant, {}):
            print()
            print(f"{variant}:")
            print("\n".join(levers_table(report["results"][variant], report["results"])))
            break


if __name__ == "__main__":
    main()
