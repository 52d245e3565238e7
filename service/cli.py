"""Command line: `python -m service generate "lad with a red beanie, green background" --seed 7 -o out.png`."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from service import config

from service.lora import evaluate

from service.lora import report as lora_report

from service.weights import commands as weights
from service.config import Settings
from service.errors import WeightsError
from service.lora.inspect import LoraError

if TYPE_CHECKING:
    from service.engine import GenerationResult


def write_outputs(result: "GenerationResult", output: Path) -> list[Path]:
    """out.png (upscaled), out.sprite.png (grid x grid), out.smooth.png (upscaler realesrgan) and out.json per
    image; -1, -2 ... when several."""
    written = []
    summary = result.summary()
    for index, image in enumerate(result.images, start=1):
        stem = output.with_suffix("") if len(result.images) == 1 else output.with_name(f"{output.stem}-{index}")
        paths = [stem.with_suffix(".png"), stem.with_suffix(".sprite.png"), stem.with_suffix(".json")]
        image.art.image.save(paths[0])
        image.art.sprite.save(paths[1])
        if image.smooth is not None:
            paths.insert(2, stem.with_suffix(".smooth.png"))
            image.smooth.save(paths[2])
        paths[-1].write_text(json.dumps(summary | {"images": [summary["images"][index - 1]]}, indent=2) + "\n")
        written += paths
    return written


def generate(args: argparse.Namespace) -> int:
    from service.engine import Engine, GenerationRequest  # torch: imported only by the commands that need it

    request = GenerationRequest(
        prompt=args.prompt, seed=args.seed, num_images=args.num_images, steps=args.steps, guidance=args.guidance,
        upscaler=args.upscaler,
    )
    request.check()
    engine = Engine.load(Settings(upscaler=args.upscaler) if args.upscaler else Settings())
    with tqdm(total=1, unit="step", desc="generating") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = engine.generate(request, progress)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for path in write_outputs(result, args.output):
        print(path)
    if result.dropped_words:
        print(f"warning: prompt too long for CLIP, dropped: {result.dropped_words!r}", file=sys.stderr)
    for image in result.images:
        quality = image.art.quality
        verdict = "pixel art" if quality.is_pixel_art else "NOT pixel art"
        print(f"seed {image.seed}: {verdict} (grid fit {quality.grid_fit:.2f}, {quality.palette_size} colours)")
    if engine.weights.is_smoke:
        print("warning: made with the random SMOKE model, the image is not meaningful", file=sys.stderr)
    return 0


def compile_cache(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from service.acceleration import save_compile_artifacts
    from service.engine import Engine

    if not torch.cuda.is_available():
        raise ValueError("compile-cache: needs a CUDA GPU (the compile records CUDA graphs)")
    settings = Settings(compile=True)
    output = args.output or settings.compile_artifacts_path()
    with tempfile.TemporaryDirectory() as empty:  # a cold compile, so that every artifact is recorded
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = empty
        os.environ["TRITON_CACHE_DIR"] = os.path.join(empty, "triton")
        Engine.load(settings.model_copy(update={"compile_artifacts": Path(empty) / "none"}))  # warm-up compiles
        size = save_compile_artifacts(output)
    print(f"{output} ({size / 1e6:.1f} MB): start with PUNKS_COMPILE=true and this file in place to skip most of the compile")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m service", description="Bespoke punks: 24x24 pixel-art portraits.")
    commands = root.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate a portrait from a short description")
    gen.add_argument("prompt", help='e.g. "lad with a red beanie, green background"')
    gen.add_argument("--seed", type=int, help="random when omitted; printed and saved in the JSON")
    gen.add_argument("--num-images", type=int, default=1, help=f"1-{config.MAX_IMAGES}")
    gen.add_argument("--steps", type=int, help=f"{config.MIN_STEPS}-{config.MAX_STEPS} (default PUNKS_STEPS)")
    gen.add_argument("--guidance", type=float, help=f"{config.MIN_GUIDANCE}-{config.MAX_GUIDANCE} (default PUNKS_GUIDANCE)")
    gen.add_argument("--upscaler", choices=config.UPSCALERS,
                     help="realesrgan: also out.smooth.png, the raw generation upscaled (default PUNKS_UPSCALER)")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="PNG path (default out.png)")
    gen.set_defaults(run=generate)

    cache = commands.add_parser("compile-cache", help="compile every batch bucket on this GPU and save the portable "
                                "compile cache that later starts load (PUNKS_COMPILE=true)")
    cache.add_argument("-o", "--output", type=Path, help="default: PUNKS_COMPILE_ARTIFACTS or weights/torch-compile-artifacts.bin")
    cache.set_defaults(run=compile_cache)

    lora_report.add_commands(commands)
    weights.add_commands(commands)
    evaluate.add_command(commands)
    return root


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:  # bad input (LoraError is a ValueError too, but is a weights problem)
        if isinstance(error, LoraError):
            print(f"error: wrong LoRA: {error}", file=sys.stderr)
            return 1
        print(f"error: {error}", file=sys.stderr)
        return 2
    except WeightsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
