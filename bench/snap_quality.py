"""How exactly the snapper (service/pixelart.py) recovers punk-like sprites, and how long it takes on one core.

    .venv/bin/python bench/snap_quality.py --out bench/results/            # 200 sprites, seeds 10000..
    .venv/bin/python bench/snap_quality.py --first-seed 0 --count 100 --misses   # tuning seeds, list misses

Ground truth comes from tests/synthetic_sprites.py: `make_punk(seed)` (one-cell eyes and highlights, often pure
white, two-cell mouths, close dark shades, outlines, 4-16 colours, flat or checkered backgrounds) rendered by
`degrade` with `Degradation.severe` (cells 19-23 px, lines bent up to +-6 px, blur 0.6-1.8 px, noise 4-10, JPEG
65-95, smooth drift up to +-10 per channel). A sprite is exact when all 576 cells are within RGB distance 20 of
the truth; its palette is right when it has exactly the truth's number of colours.

Timing: the process is pinned to one CPU core with single-threaded BLAS/OpenMP, each image is snapped once to
warm up and then `--repeats` times; the per-image median is reported (mean and p95 over images too).
`--compare` also runs the pixel-art cleaners from PyPI that are importable in this interpreter (install them in
a throwaway venv, never in the project) on the same renders.
"""

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy is imported
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.pixelart import snap_to_grid  # noqa: E402
from tests.synthetic_sprites import GRID, Degradation, degrade, make_punk  # noqa: E402

CELL_TOLERANCE = 20.0
Snapper = Callable[[Image.Image], Image.Image]


def render(seed: int) -> tuple[Image.Image, Image.Image, Degradation]:
    """(truth, degraded 512 render, its degradation) for one seed: the same as tests/test_pixelart.py builds."""
    truth = make_punk(seed)
    rng = np.random.default_rng(seed)
    params = Degradation.severe(rng)
    return truth, degrade(truth, rng, params), params


def score(recovered: Image.Image, truth: Image.Image) -> tuple[int, bool, list]:
    """(cells off, palette size right, [(row, col, truth, got)] of the cells off)."""
    got = np.asarray(recovered.convert("RGB").resize((GRID, GRID), Image.NEAREST), dtype=int)
    want = np.asarray(truth, dtype=int)
    off = np.linalg.norm(got - want, axis=-1) > CELL_TOLERANCE
    palette_right = len(np.unique(got.reshape(-1, 3), axis=0)) == len(np.unique(want.reshape(-1, 3), axis=0))
    wrong = [(int(r), int(c), want[r, c].tolist(), got[r, c].tolist()) for r, c in np.argwhere(off)]
    return int(off.sum()), palette_right, wrong


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def other_snappers() -> dict[str, Snapper]:
    """PyPI pixel-art cleaners importable here, each asked for a 24x24 result."""
    found: dict[str, Snapper] = {}
    try:
        from proper_pixel_art import pixelate  # type: ignore[import-not-found]

        def proper(image: Image.Image) -> Image.Image:
            return pixelate.pixelate(image, num_colors=None, result_scale=1)

        found["proper-pixel-art"] = proper
    except ImportError:
        pass
    try:
        import unfake  # type: ignore[import-not-found]  # noqa: F401

        def unfake_snap(image: Image.Image) -> Image.Image:
            from unfake import process_image_sync  # type: ignore[import-not-found]

            result = process_image_sync(image, max_colors=32, auto_color_detect=True, cleanup={"morph": False})
            return result["image"]

        found["unfake"] = unfake_snap
    except ImportError:
        pass
    return found


def measure(snap: Snapper, cases: list, repeats: int, show_misses: bool) -> dict:
    exact = palette_right = cells_off = 0
    times: list[float] = []
    misses = []
    for seed, truth, image, params in cases:
        recovered = snap(image)
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            snap(image)
            runs.append(time.perf_counter() - start)
        times.append(statistics.median(runs) * 1000)
        try:
            off, palette_ok, wrong = score(recovered, truth)
        except ValueError:
            off, palette_ok, wrong = GRID * GRID, False, []
        exact += off == 0
        palette_right += palette_ok
        cells_off += off
        if off or not palette_ok:
            misses.append({"seed": seed, "cells_off": off, "palette_right": palette_ok, "wrong": wrong[:6]})
            if show_misses:
                print(f"seed {seed}: {off} cells off, palette {'ok' if palette_ok else 'WRONG'}, {params}", wrong[:6])
    n = len(cases)
    return {
        "sprites": n,
        "exact_sprites": round(exact / n, 4),
        "palette_size_right": round(palette_right / n, 4),
        "cells_right": round(1 - cells_off / (n * GRID * GRID), 5),
        "ms_per_image_median": round(statistics.median(times), 2),
        "ms_per_image_mean": round(statistics.mean(times), 2),
        "ms_per_image_p95": round(float(np.percentile(times, 95)), 2),
        "misses": misses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first-seed", type=int, default=10000)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    parser.add_argument("--compare", action="store_true", help="also run PyPI cleaners importable here")
    parser.add_argument("--misses", action="store_true", help="print every sprite that is not exact")
    parser.add_argument("--label", default="", help="name of the run in the JSON (e.g. before)")
    parser.add_argument("--out", type=Path, help="folder for the JSON result")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    cases = [(seed, *render(seed)) for seed in range(args.first_seed, args.first_seed + args.count)]
    results = {"bespoke-punks": measure(lambda image: snap_to_grid(image, GRID), cases, args.repeats, args.misses)}
    if args.compare:
        for name, snap in other_snappers().items():
            results[name] = measure(snap, cases, 1, False)
    for name, result in results.items():
        summary = {k: v for k, v in result.items() if k != "misses"}
        print(name, json.dumps(summary))
    report = {
        "environment": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "cpu": cpu_name(),
            "threads": "1 core (sched_setaffinity), OMP/OpenBLAS/MKL_NUM_THREADS=1",
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": importlib.metadata.version("pillow"),
            "commit": git_commit(),
        },
        "set": f"make_punk(seed) + Degradation.severe, seeds {args.first_seed}..{args.first_seed + args.count - 1}",
        "label": args.label,
        "command": " ".join(["python", *sys.argv]),
        "results": results,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"{report['environment']['date']}-snap-quality{'-' + args.label if args.label else ''}.json"
        (args.out / name).write_text(json.dumps(report, indent=1) + "\n")
        print("wrote", args.out / name)


if __name__ == "__main__":
    main()
