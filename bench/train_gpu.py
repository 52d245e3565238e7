"""`punks train` on a CUDA GPU: speed and memory of the recipe, and the epoch ranking on a real (small) model.

    python -m bench.train_gpu speed OUT.json   # full-size SD1.5 architecture, random weights, 512 px, batch 1-4
    python -m bench.train_gpu demo OUT_DIR     # the demo model's base trained on generated punks, every epoch ranked

speed: per batch size, one warm-up epoch then one timed epoch of the real training loop (service/training/loop.py:
peft rank-32 adapters, bf16 autocast, AdamW) on 24 generated sprites; steps/s, images/s and peak CUDA memory. Then
`lora evaluate` of two checkpoints (the default 8 prompts, 1 seed, 25 steps) for the per-epoch evaluation cost, and
the projected wall time of the seed's run: 203 images x 10 epochs, each epoch evaluated. The weights are random:
speed and memory do not depend on their values.

demo: the demo model's base (devtools/demo_model, no LoRA) trained for a few epochs at 512 px on generated punks
with their full captions (train/sprites.py); the ranking should put a later epoch first (the base alone draws soft
renders the snapper's verdict rejects). Writes the evaluation (contact sheet, ranking) and training.json to OUT_DIR.
"""

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.bench import environment
from service.training.captions import write_caption
from service.training.data import Example
from service.training.loop import EpochLog, train_lora
from service.training.recipe import Recipe
from service.training.run import DEFAULT_EVAL_STEPS, rank_epochs

SEED_RUN_IMAGES, SEED_RUN_EPOCHS = 203, 10
BATCH_SIZES = (1, 2, 3, 4)
SPEED_IMAGES = 24  # per epoch: 24 steps at batch 1, 6 at batch 4


def generated_examples(count: int, seed: int, full_captions: bool) -> list[Example]:
    """Generated punks; with full_captions their true attributes in the seed's format, else written captions."""
    from train import sprites

    rng = np.random.default_rng(seed)
    examples = []
    for index in range(count):
        punk = sprites.random_punk(rng)
        pixels = sprites.render(punk)
        sprite = Image.fromarray(pixels)
        caption = sprites.full_caption(punk, pixels) if full_captions else write_caption(sprite, "lad")
        examples.append(Example(f"p{index:04d}", sprite, caption, not full_captions))
    return examples


def projection(steps_s: dict[int, float], eval_s_per_epoch: float) -> dict:
    """Wall time of the seed's run (203 images x 10 epochs, every epoch evaluated) at each measured batch size."""
    result = {}
    for batch, rate in steps_s.items():
        steps = math.ceil(SEED_RUN_IMAGES / batch) * SEED_RUN_EPOCHS
        training = steps / rate
        result[batch] = {
            "steps": steps,
            "training_s": round(training),
            "evaluation_s": round(eval_s_per_epoch * SEED_RUN_EPOCHS),
            "total_min": round((training + eval_s_per_epoch * SEED_RUN_EPOCHS) / 60, 1),
        }
    return result


def speed(output: Path) -> dict:
    from devtools.smoke import build_full_size_pipeline

    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    base = work / "sd15"
    build_full_size_pipeline().to(torch.float16).save_pretrained(base, safe_serialization=True)
    examples = generated_examples(SPEED_IMAGES, 0, full_captions=False)
    rows = {}
    checkpoints: list[Path] = []
    for batch in BATCH_SIZES:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        epochs: list[EpochLog] = []
        folder = work / f"batch{batch}"
        checkpoints = train_lora(
            base, examples, Recipe(epochs=2, batch_size=batch), folder, "bench", "cuda", False, epochs.append
        )
        timed = epochs[-1]  # the first epoch compiles kernels and tunes convolutions
        rows[batch] = {
            "steps_s": round(timed.steps / timed.seconds, 3),
            "images_s": round(len(examples) / timed.seconds, 3),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "loss": timed.loss,
        }
        print(f"batch {batch}: {rows[batch]}", flush=True)
    from service.config import Settings
    from service.lora import evaluate

    started = time.perf_counter()
    settings = Settings(base_model=base, warmup=False, steps=DEFAULT_EVAL_STEPS, device="cuda")
    prompts = evaluate.load_prompts()
    rank_epochs(checkpoints, settings, prompts, list(evaluate.DEFAULT_SEEDS), DEFAULT_EVAL_STEPS, work / "evaluation")
    eval_s = (time.perf_counter() - started) / len(checkpoints)
    result = {
        "environment": environment(),
        "command": "python -m bench.train_gpu " + " ".join(sys.argv[1:]),
        "model": "SD1.5 architecture (UNet 860M, CLIP ViT-L/14, VAE), random weights, bf16 base, fp32 LoRA",
        "recipe": "rank 32 / alpha 16, 512 px, AdamW, text encoder and UNet adapters",
        "batch": rows,
        "evaluation_s_per_epoch": round(eval_s, 1),  # an upper bound: the engine's load is shared by 2, not 10
        "evaluation": f"{len(prompts)} prompts x {len(evaluate.DEFAULT_SEEDS)} seed, {DEFAULT_EVAL_STEPS} steps",
        "seed_run_projection": projection({b: r["steps_s"] for b, r in rows.items()}, eval_s),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return result


def demo(
    out: Path,
    images: int = 256,
    epochs: int = 4,
    device: str = "cuda",
    eval_steps: int = DEFAULT_EVAL_STEPS,
    seeds: tuple[int, ...] = (1, 2, 3, 4),
) -> dict:
    from devtools.demo import DEMO_DIR, DEMO_FOLDER
    from service.config import Settings
    from service.lora import evaluate

    base = DEMO_DIR / DEMO_FOLDER
    examples = generated_examples(images, 1, full_captions=True)
    recipe = Recipe(epochs=epochs, batch_size=4, learning_rate=1e-3, text_encoder_learning_rate=5e-4)
    epoch_logs: list[EpochLog] = []
    started = time.perf_counter()
    checkpoints = train_lora(base, examples, recipe, out / "checkpoints", "demo", device, False, epoch_logs.append)
    training_s = time.perf_counter() - started
    settings = Settings(base_model=base, warmup=False, steps=eval_steps, device=device)
    ranked = rank_epochs(checkpoints, settings, evaluate.load_prompts(), list(seeds), eval_steps, out / "evaluation")
    best_epoch = int(ranked[0]["name"].rsplit("-", 1)[1])
    result = {
        "environment": environment(),
        "command": "python -m bench.train_gpu " + " ".join(sys.argv[1:]),
        "images": images,
        "evaluation": {"seeds": list(seeds), "steps": eval_steps},
        "recipe": {"epochs": epochs, "batch_size": 4, "learning_rate": 1e-3, "text_encoder_learning_rate": 5e-4},
        "epochs": [e.__dict__ for e in epoch_logs],
        "training_s": round(training_s, 1),
        "ranking": [{k: r[k] for k in ("rank", "name", "score", "pixel_art", "images")} for r in ranked],
        "best_epoch": best_epoch,
        "later_epoch_beats_the_first": best_epoch > 1,
    }
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    for folder in (out / "checkpoints", out / "evaluation" / "sprites"):  # the ranking and sheet are the result
        shutil.rmtree(folder)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("speed", "demo"))
    parser.add_argument("output", type=Path, help="speed: a .json file; demo: a folder")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.train_gpu needs a CUDA GPU")
    result = speed(args.output) if args.mode == "speed" else demo(args.output)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
