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
from service.config import Settings
from service.errors import WeightsError
from service.lora import evaluate
from service.lora import report as lora_report
from service.lora.inspect import LoraError
from service.samplers import SAMPLER_NAMES
from service.sprite_controls import KEEP, PRESETS, palette_from_text
from service.training import run as training
from service.weights import cli as weights_cli

if TYPE_CHECKING:
    from service.engine import GenerationRequest, GenerationResult


def write_outputs(result: "GenerationResult", request: "GenerationRequest", output: Path) -> list[Path]:
    """out.png (upscaled), out.sprite.png (grid x grid), out.smooth.png (upscaler realesrgan) and out.json per
    image; -1, -2 ... when several. Encoded by service/delivery.py, as the HTTP API and Cog encode them."""
    from service.delivery import encode_images, summary

    fmt = request.output_format
    result_summary = summary(result)
    written = []
    for index, image in enumerate(encode_images(result.images, fmt, sprites=True), start=1):
        stem = output.with_suffix("") if len(result.images) == 1 else output.with_name(f"{output.stem}-{index}")
        files = [(f".{fmt}", image.image), (f".sprite.{fmt}", image.sprite), (f".smooth.{fmt}", image.smooth)]
        files.append((".json", (json.dumps(result_summary | {"images": [image.summary]}, indent=2) + "\n").encode()))
        for suffix, data in files:
            if data is not None:
                path = stem.with_name(stem.name + suffix)
                path.write_bytes(data)
                written.append(path)
    return written


def prepare_output(output: Path) -> None:
    """Create the output's folder before the slow load, so that a path that cannot be written fails at once."""
    if output.name in ("", ".", ".."):
        raise ValueError(f"output: must name a file, e.g. out.png, got {str(output)!r}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"output: cannot create the folder {output.parent} ({error.strerror})") from None


def generate(args: argparse.Namespace) -> int:
    from service.delivery import describe, warnings
    from service.engine import Engine, GenerationRequest  # torch: imported only by the commands that need it
    from service.images import read_image_file

    request = GenerationRequest(
        prompt=args.prompt,
        seed=args.seed,
        num_outputs=args.num_outputs,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        lora_scale=args.lora_scale,
        sampler=args.sampler,
        upscaler=args.upscaler,
        output_size=args.output_size,
        integer_scale=args.integer_scale,
        output_format=args.output_format,
        palette=palette_from_text(args.palette) if args.palette is not None else None,
        background=args.background,
        image=read_image_file(args.image) if args.image is not None else None,
        strength=args.strength,
    )
    request.check()  # before the slow load
    prepare_output(args.output)
    engine = Engine.load(Settings(upscaler=args.upscaler) if args.upscaler else Settings())
    with tqdm(total=1, unit="step", desc="generating") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = engine.generate(request, progress)
    for path in write_outputs(result, request, args.output):
        print(path)
    for image in result.images:
        print(describe(image))
    for note in warnings(result, engine.is_smoke, engine.weights.is_demo):
        print(f"warning: {note}", file=sys.stderr)
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
    print(
        f"{output} ({size / 1e6:.1f} MB): "
        "start with PUNKS_COMPILE=true and this file in place to skip most of the compile"
    )
    return 0


def serve_http(args: argparse.Namespace) -> int:
    from service.http import serve  # imported when it runs: the other commands need neither uvicorn nor FastAPI

    return serve.main(args)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m service", description="Bespoke punks: 24x24 pixel-art portraits.")
    commands = root.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate a portrait from a short description")
    gen.add_argument("prompt", help='e.g. "lad with a red beanie, green background"')
    gen.add_argument("--seed", type=int, help="random when omitted; printed and saved in the JSON")
    gen.add_argument("--num-outputs", type=int, default=1, help=f"1-{config.MAX_IMAGES}")
    gen.add_argument(
        "--num-inference-steps", type=int, help=f"{config.MIN_STEPS}-{config.MAX_STEPS} (default PUNKS_STEPS)"
    )
    gen.add_argument(
        "--guidance-scale", type=float, help=f"{config.MIN_GUIDANCE}-{config.MAX_GUIDANCE} (default PUNKS_GUIDANCE)"
    )
    gen.add_argument("--negative-prompt", help="words added to the fixed negative prompt (never replacing it)")
    gen.add_argument(
        "--lora-scale",
        type=float,
        help=f"{config.MIN_LORA_SCALE}-{config.MAX_LORA_SCALE}: strength of the LoRA (default PUNKS_LORA_SCALE)",
    )
    gen.add_argument(
        "--sampler",
        metavar="NAME",
        help=f"A1111 sampler name or alias: {', '.join(SAMPLER_NAMES)} (default PUNKS_SCHEDULER's, DPM++ 2M)",
    )
    gen.add_argument(
        "--upscaler",
        choices=config.UPSCALERS,
        help="realesrgan: also out.smooth.png, the raw generation upscaled (default PUNKS_UPSCALER)",
    )
    gen.add_argument(
        "--output-size",
        type=int,
        help=f"{config.MIN_OUTPUT_SIZE}-{config.MAX_OUTPUT_SIZE} px (default PUNKS_OUTPUT_SIZE)",
    )
    gen.add_argument(
        "--integer-scale",
        action=argparse.BooleanOptionalAction,
        help="cells of exactly floor(output_size / 24) px (default PUNKS_INTEGER_SCALE)",
    )
    gen.add_argument(
        "--output-format", choices=config.OUTPUT_FORMATS, default="png", help="lossless png (default) or webp"
    )
    # pixel-art controls and variations
    gen.add_argument(
        "--palette",
        metavar="PALETTE",
        help=f"every cell takes one of these colours: {' or '.join(PRESETS)}, or up to {config.MAX_PALETTE_COLORS} "
        "'#rrggbb' separated by commas",
    )
    gen.add_argument(
        "--background",
        default=KEEP,
        metavar="BACKGROUND",
        help="keep (default), transparent (RGBA output) or a '#rrggbb' to recolour it",
    )
    gen.add_argument("--image", type=Path, help="make variations of this image (a 24x24 sprite or any PNG/JPEG/WebP)")
    gen.add_argument(
        "--strength",
        type=float,
        help=f"how far a variation may move from --image, 0-1 (default {config.DEFAULT_STRENGTH})",
    )
    gen.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("out.png"),
        help="output path; its suffix is replaced by the format's (default out.png)",
    )
    gen.set_defaults(run=generate)

    cache = commands.add_parser(
        "compile-cache",
        help="compile every batch bucket on this GPU and save the portable "
        "compile cache that later starts load (PUNKS_COMPILE=true)",
    )
    cache.add_argument(
        "-o", "--output", type=Path, help="default: PUNKS_COMPILE_ARTIFACTS or weights/torch-compile-artifacts.bin"
    )
    cache.set_defaults(run=compile_cache)

    serve = commands.add_parser(
        "serve", help="run the HTTP API with the PUNKS_* limits (host, port, timeouts, concurrency, bounded shutdown)"
    )
    serve.add_argument("--host", help="default PUNKS_HOST (127.0.0.1)")
    serve.add_argument("--port", type=int, help="default PUNKS_PORT (8000)")
    serve.set_defaults(run=serve_http)

    lora_report.add_commands(commands)
    weights_cli.add_commands(commands)
    evaluate.add_command(commands)
    training.add_command(commands)
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
    except (WeightsError, OSError) as error:  # OSError: a file that cannot be read or written (disk full, a folder)
        print(f"error: {error}", file=sys.stderr)
        return 1
