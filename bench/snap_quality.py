"""How exactly the snapper (service/pixelart.py) recovers punk-like sprites, and how long it takes on one core.

    .venv/bin/python -m bench.snap_quality --out bench/results/            # 200 sprites, seeds 10000..
    .venv/bin/python -m bench.snap_quality --first-seed 0 --count 100 --misses   # tuning seeds, list misses

Ground truth comes from tests/synthetic_sprites.py: `make_punk(seed)` (one-cell eyes and highlights, often pure
white, two-cell mouths, close dark shades, outlines, 4-16 colours, flat or checkered backgrounds) rendered by
`degrade` with `Degradation.severe` (cells 19-23 px, lines bent up to +-6 px, blur 0.6-1.8 px, noise 4-10, JPEG
65-95, smooth drift up to +-10 per channel). A sprite is exact when all 576 cells are within RGB distance 20 of
the truth; its palette is right when it has exactly the truth's number of colours.

Timing: the process is pinned to one CPU core with single-threaded BLAS/OpenMP, each image is snapped once to
warm up and then `--repeats` times; the fastest run counts for that image (other work on a shared machine only
adds time), and the median, mean and p95 over images are reported. `--baseline COMMIT` times the snapper as of
that commit on the same images, interleaved image by image, for a before/after on the same machine load.
`--compare` also runs the pixel-art cleaners from PyPI that are importable in this interpreter (install them in
a throwaway venv, never in the project) on the same renders.
"""

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy is imported
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from service.pixelart import snap_to_grid  # noqa: E402
from tests.synthetic_sprites import GRID, severe_punk  # noqa: E402

CELL_TOLERANCE = 20.0
Snapper = Callable[[Image.Image], Image.Image]


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
    """HEAD, marked when service/pixelart.py differs from it (then the numbers are not that commit's)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "service/pixelart.py"]).returncode != 0
    return head + (" + uncommitted service/pixelart.py" if changed else "")


def other_snappers() -> dict[str, Snapper]:
    """PyPI pixel-art cleaners importable here. Neither takes a grid size, so each is told the nominal pixel
    width (512 / 24 -> 21 px, the closest they accept); a result that is not 24x24 is scaled to 24x24 by
    nearest neighbour before scoring."""
    logging.disable(logging.INFO)  # unfake logs every step
    found: dict[str, Snapper] = {}
    width = round(512 / GRID)
    try:
        from proper_pixel_art import PixelateConfig, pixelate  # type: ignore[import-not-found]

        found["proper-pixel-art"] = lambda image: pixelate(image, PixelateConfig(pixel_width=width)).image
    except ImportError:
        pass
    try:
        from unfake import process_image_sync  # type: ignore[import-not-found]

        found["unfake"] = lambda image: process_image_sync(image, manual_scale=width)["image"]
    except ImportError:
        pass
    return found


def load_snapper_at(commit: str) -> Snapper:
    """snap_to_grid from service/pixelart.py as committed at `commit` (imported from a temporary file)."""
    source = subprocess.run(
        ["git", "show", f"{commit}:service/pixelart.py"], capture_output=True, text=True, check=True
    ).stdout
    folder = Path(tempfile.mkdtemp())
    (folder / "pixelart_baseline.py").write_text(source)
    spec = importlib.util.spec_from_file_location("pixelart_baseline", folder / "pixelart_baseline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pixelart_baseline"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return lambda image: module.snap_to_grid(image, GRID)


def best_ms(snap: Snapper, image: Image.Image, repeats: int) -> float:
    """The fastest of `repeats` runs: other work on the machine only ever adds time."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        snap(image)
        runs.append(time.perf_counter() - start)
    return min(runs) * 1000


def measure_interleaved(snappers: dict[str, Snapper], cases: list, repeats: int, show_misses: bool) -> dict:
    """Every snapper on every render, image by image in turn, so that both see the same machine load."""
    times: dict[str, list[float]] = {name: [] for name in snappers}
    recovered: dict[str, list[Image.Image]] = {name: [] for name in snappers}
    for _seed, _truth, image, _params in cases:
        for name, snap in snappers.items():
            recovered[name].append(snap(image))
            times[name].append(best_ms(snap, image, repeats))
    return {
        name: summarise(recovered[name], times[name], cases, show_misses and index == 0)
        for index, name in enumerate(snappers)
    }


def measure(snap: Snapper, cases: list, repeats: int, show_misses: bool) -> dict:
    recovered, times = [], []
    for _seed, _truth, image, _params in cases:
        recovered.append(snap(image))
        times.append(best_ms(snap, image, repeats))
    return summarise(recovered, times, cases, show_misses)


def summarise(recovered: list[Image.Image], times: list[float], cases: list, show_misses: bool) -> dict:
    exact = palette_right = cells_off = 0
    misses = []
    for sprite, (seed, truth, _image, params) in zip(recovered, cases, strict=True):
        try:
            off, palette_ok, wrong = score(sprite, truth)
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
        "ms_per_image_median": round(statistics.median(times), 2),  # per image: the best of --repeats runs
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
    parser.add_argument(
        "--baseline",
        metavar="COMMIT",
        help="also run service/pixelart.py as of this commit on the same renders, timed interleaved with the "
        "current one (the ratio holds even when other work shares the machine)",
    )
    parser.add_argument("--label", default="", help="name of the run in the JSON (e.g. before)")
    parser.add_argument("--out", type=Path, help="folder for the JSON result")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    cases = [(seed, *severe_punk(seed)) for seed in range(args.first_seed, args.first_seed + args.count)]
    snappers: dict[str, Snapper] = {"bespoke-punks": lambda image: snap_to_grid(image, GRID)}
    if args.baseline:
        snappers[f"bespoke-punks@{args.baseline}"] = load_snapper_at(args.baseline)
    results = measure_interleaved(snappers, cases, args.repeats, args.misses)
    if args.compare:
        for name, snap in other_snappers().items():
            results[name] = measure(snap, cases, 1, False)
            results[name]["version"] = importlib.metadata.version(name)
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
        "command": " ".join(["python", "-m", "bench.snap_quality", *sys.argv[1:]]),
        "results": results,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"{report['environment']['date']}-snap-quality{'-' + args.label if args.label else ''}.json"
        (args.out / name).write_text(json.dumps(report, indent=1) + "\n")
        print("wrote", args.out / name)


if __name__ == "__main__":
    main()
