"""What the demo model draws, through the real engine: the share the snapper's verdict calls pixel art with the
rank-32 LoRA fused and without it (the seed's story: base on smooth renderings, LoRA on crisp ones), and how often
the attribute a prompt asks for (background colour, cap, sunglasses) is in the snapped sprite. Also a contact sheet.

    python -m train.demo_eval --sheet docs/demo-contact-sheet.png --json bench/results/DATE-demo-model.json

tests/test_demo_model.py runs the same measurement, smaller (256 px, few steps), on every test run.
"""

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from PIL import Image, ImageDraw

from service.config import Settings
from service.lora.evaluate import COLOURS, background_adherence
from train import sprites

# (prompt, the attribute it asks for), drawn in turn over the seeds
PROMPTS = (
    ("punk with a cap, blue background", "blue"),
    ("punk with a cap, red background", "cap"),
    ("lad with sunglasses, green background", "sunglasses"),
    ("lad with a red beanie, yellow background", "yellow"),
)
MIN_BACKGROUND_SHARE = 0.5  # of the sprite's border cells in the asked colour
DARK = 70  # an RGB channel maximum below this is "dark" (sunglasses)


def has_background(sprite: np.ndarray, colour: str) -> bool:
    return background_adherence(Image.fromarray(sprite), COLOURS[colour]) >= MIN_BACKGROUND_SHARE


def has_cap(sprite: np.ndarray) -> bool:
    """A cap's brim sticks out right of the head (columns 19-20), where nothing else of a portrait reaches."""
    brim = sprite[sprites.BRIM_ROW - 1 : sprites.BRIM_ROW + 1, sprites.BRIM_COLS[1] - 2 : sprites.BRIM_COLS[1]]
    background = sprite[:, 0].astype(int)  # the left column: background, in both colours when checkered
    distance = np.abs(brim.astype(int)[:, :, None] - background[None, None]).sum(axis=-1).min(axis=-1)
    return int((distance > 60).sum()) >= distance.size // 2


def has_sunglasses(sprite: np.ndarray) -> bool:
    """Dark across both eyes and the bridge between them, the whites of the eyes included (glasses keep them)."""
    band = sprite[sprites.EYE_ROW - 1 : sprites.EYE_ROW + 1, sprites.LEFT_EYE[0] : sprites.RIGHT_EYE[1]].astype(int)
    dark = band.max(axis=-1) < DARK
    whites = dark[1, 0] and dark[1, sprites.RIGHT_EYE[0] - sprites.LEFT_EYE[0]]
    return bool(whites) and float(dark.mean()) >= 0.75


def attribute_present(sprite: np.ndarray, attribute: str) -> bool:
    if attribute == "cap":
        return has_cap(sprite)
    if attribute == "sunglasses":
        return has_sunglasses(sprite)
    return has_background(sprite, attribute)


@dataclass(frozen=True)
class Drawn:
    prompt: str
    attribute: str
    seed: int
    raw: Image.Image
    sprite: np.ndarray
    is_pixel_art: bool

    @property
    def has_attribute(self) -> bool:
        return attribute_present(self.sprite, self.attribute)


def draw(settings: Settings, seeds: int) -> list[Drawn]:
    """`seeds` images through the engine the service runs, the prompts in turn (seeds 0, 1, ... per prompt)."""
    from service.engine import Engine, GenerationRequest

    engine = Engine.load(settings)
    assert engine.weights.is_demo, "no demo model: is devtools/demo_model in this checkout?"
    per_prompt = -(-seeds // len(PROMPTS))
    requests = []
    for prompt, _ in PROMPTS:
        for start in range(0, per_prompt, 4):  # at most 4 images a request
            requests.append(GenerationRequest(prompt, seed=start, num_outputs=min(4, per_prompt - start)))
    results = engine.generate_batch(requests)
    attributes = dict(PROMPTS)
    return [
        Drawn(
            prompt=request.prompt,
            attribute=attributes[request.prompt],
            seed=image.seed,
            raw=image.raw,
            sprite=np.asarray(image.art.sprite.convert("RGB")),
            is_pixel_art=image.art.quality.is_pixel_art,
        )
        for request, result in zip(requests, results, strict=True)
        for image in result.images
    ][:seeds]


def measure(settings: Settings, seeds: int) -> dict:
    """Pixel-art shares with and without the LoRA (fused at scale 0) and the attribute share, with the LoRA."""
    start = time.time()
    with_lora = draw(settings, seeds)
    without_lora = draw(Settings(**settings.model_dump() | {"lora_scale": 0.0}), seeds)
    return {
        "seeds": seeds,
        "steps": settings.steps,
        "generation_size": settings.generation_size,
        "pixel_art_with_lora": float(np.mean([d.is_pixel_art for d in with_lora])),
        "pixel_art_without_lora": float(np.mean([d.is_pixel_art for d in without_lora])),
        "attribute_present": float(np.mean([d.has_attribute for d in with_lora])),
        "attribute_present_by_kind": {
            attribute: float(np.mean([d.has_attribute for d in with_lora if d.attribute == attribute]))
            for _, attribute in PROMPTS
        },
        "seconds": round(time.time() - start, 1),
        "drawn": {"with_lora": with_lora, "without_lora": without_lora},
    }


def contact_sheet(result: dict, tile: int = 192) -> Image.Image:
    """One row per prompt: without the LoRA (raw), with the LoRA (raw), and the snapped sprite, per seed."""
    with_lora, without_lora = result["drawn"]["with_lora"], result["drawn"]["without_lora"]
    seeds = sorted({d.seed for d in with_lora})
    label = 36
    sheet = Image.new("RGB", (3 * len(seeds) * tile, len(PROMPTS) * (tile + label)), "white")
    pen = ImageDraw.Draw(sheet)
    for row, (prompt, _) in enumerate(PROMPTS):
        y = row * (tile + label)
        pen.text((6, y + 10), f'"{prompt}": without LoRA | with LoRA | snapped sprite, seeds {seeds}', fill="black")
        for column, seed in enumerate(seeds):
            base = next(d for d in without_lora if d.prompt == prompt and d.seed == seed)
            lora = next(d for d in with_lora if d.prompt == prompt and d.seed == seed)
            sprite = Image.fromarray(lora.sprite).resize((tile, tile), Image.Resampling.NEAREST)
            for offset, image in enumerate((base.raw.resize((tile, tile)), lora.raw.resize((tile, tile)), sprite)):
                sheet.paste(image, ((3 * column + offset) * tile, y + label))
    return sheet


def main() -> None:
    cli = argparse.ArgumentParser(prog="python -m train.demo_eval", description=__doc__.split("\n\n")[0])
    cli.add_argument("--seeds", type=int, default=16)
    cli.add_argument("--steps", type=int, default=25)
    cli.add_argument("--size", type=int, default=512)
    cli.add_argument("--sheet", type=Path, help="write the contact sheet here")
    cli.add_argument("--json", type=Path, help="write the numbers here")
    args = cli.parse_args()
    settings = Settings(
        weights_dir=Path("/nonexistent-weights"),
        fallback_model="demo",
        device="cpu",
        steps=args.steps,
        generation_size=args.size,
        warmup=False,
    )
    result = measure(settings, args.seeds)
    numbers = {k: v for k, v in result.items() if k != "drawn"}
    numbers |= {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "versions": {m.__name__: m.__version__ for m in (torch, diffusers, transformers)},
        "prompts": [p for p, _ in PROMPTS],
    }
    print(json.dumps(numbers, indent=1))
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1) + "\n")
    if args.sheet:
        contact_sheet(result).save(args.sheet)


if __name__ == "__main__":
    main()
