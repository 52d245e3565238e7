"""What the demo model draws, through the real engine: the share the snapper's verdict calls pixel art with the
rank-32 LoRA fused and without it (the seed's story: base on smooth renderings, LoRA on crisp ones), and, for every
attribute each prompt names (background colour, headwear kind and colour, hair colour, glasses, earring, cigarette),
the share of snapped sprites that show it, read at the generator's fixed layout. Also a contact sheet.

    python -m train.demo_eval --seeds 1 --steps 25 --sheet docs/demo-contact-sheet.png --json bench/results/X.json

tests/test_demo_model.py runs the same measurement with 12 steps on every test run.
"""

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from PIL import Image, ImageDraw

from devtools.demo import DEMO_DIR, DEMO_LOG
from service.config import Settings
from train import sprites

# Every attribute each prompt names, as the Punk fields and values train/sprites.py draws. Together they name all
# ten background colours, the four headwear kinds in all eight hat colours, the eight hair colours, the three kinds
# of glasses, the earring and the cigarette, in the words of the training captions' short form.
PROMPTS: tuple[tuple[str, dict[str, str | bool]], ...] = (
    ("lad with a red beanie, green background", {"headwear": "beanie", "hat_colour": "red", "background": "green"}),
    ("punk with a blue cap, red background", {"headwear": "cap", "hat_colour": "blue", "background": "red"}),
    (
        "lad with a green top hat, yellow background",
        {"headwear": "top hat", "hat_colour": "green", "background": "yellow"},
    ),
    ("guy with a black bandana, blue background", {"headwear": "bandana", "hat_colour": "black", "background": "blue"}),
    (
        "punk with a white beanie and sunglasses, purple background",
        {"headwear": "beanie", "hat_colour": "white", "glasses": "sunglasses", "background": "purple"},
    ),
    (
        "lad with a yellow cap and glasses, pink background",
        {"headwear": "cap", "hat_colour": "yellow", "glasses": "glasses", "background": "pink"},
    ),
    (
        "guy with a purple top hat and 3d glasses, orange background",
        {"headwear": "top hat", "hat_colour": "purple", "glasses": "3d glasses", "background": "orange"},
    ),
    (
        "punk with an orange bandana and an earring, teal background",
        {"headwear": "bandana", "hat_colour": "orange", "earring": True, "background": "teal"},
    ),
    (
        "lad with short blonde hair, grey background",
        {"headwear": "none", "hair_colour": "blonde", "background": "grey"},
    ),
    (
        "punk with long black hair and a cigarette, brick background",
        {"headwear": "none", "hair_colour": "black", "cigarette": True, "background": "brick"},
    ),
    (
        "guy with spiky ginger hair and sunglasses, blue background",
        {"headwear": "none", "hair_colour": "ginger", "glasses": "sunglasses", "background": "blue"},
    ),
    ("lad with afro white hair, red background", {"headwear": "none", "hair_colour": "white", "background": "red"}),
    (
        "punk with short pink hair, yellow background",
        {"headwear": "none", "hair_colour": "pink", "background": "yellow"},
    ),
    (
        "lad with long green hair and an earring, purple background",
        {"headwear": "none", "hair_colour": "green", "earring": True, "background": "purple"},
    ),
    (
        "guy with spiky purple hair, green background",
        {"headwear": "none", "hair_colour": "purple", "background": "green"},
    ),
    (
        "punk with short brown hair and glasses, teal background",
        {"headwear": "none", "hair_colour": "brown", "glasses": "glasses", "background": "teal"},
    ),
)
DARK = 70  # an RGB channel maximum below this is "dark" (sunglasses)
HELD_OUT_SEED = 100  # the evaluation's seeds start here: train/run.py's samples use seeds 0-3
CLOSE = 48  # a cell is "of a colour" within this many levels on every channel
(TOP, BOTTOM), (LEFT, RIGHT) = sprites.HEAD_ROWS, sprites.HEAD_COLS
CROWN = (slice(TOP, TOP + 2), slice(LEFT + 1, RIGHT - 1))  # the head's top: every hat and every hair style covers it


def _bare() -> sprites.Punk:
    """A bald, bare-headed portrait: what headwear and hair styles paint over."""
    return sprites.Punk("lad", "light male skin tone", "blue eyes", "smile", "bald", "black", "none", "red", "none",
                        False, False, "white", "grey", False)  # fmt: skip


def _painted(**changes) -> np.ndarray:
    """Cells that `changes` paint on the bare portrait: where a headwear kind or a hair style draws."""
    return (sprites.render(_bare()) != sprites.render(replace(_bare(), **changes))).any(-1)


OUTLINE_CELLS = (sprites.render(_bare()) == sprites.OUTLINE).all(-1)  # black hair or a black hat hides in them
HAT_CELLS = {kind: _painted(headwear=kind) & ~OUTLINE_CELLS for kind in sprites.HEADWEAR[1:]}
HAIR_CELLS = np.any([_painted(hair_style=style) for style in ("short", "long", "spiky", "mohawk")], axis=0)
AFRO_ONLY_CELLS = _painted(hair_style="afro") & ~np.any(list(HAT_CELLS.values()), axis=0) & ~OUTLINE_CELLS


def nearest(colour: np.ndarray, names: Mapping[str, tuple[str, ...]]) -> str:
    """The name whose colours (hex codes) are nearest to `colour` (RGB)."""
    distance = {
        name: min(np.abs(colour.astype(int) - sprites.rgb(code)).sum() for code in codes)
        for name, codes in names.items()
    }
    return min(distance, key=distance.__getitem__)


def background(sprite: np.ndarray) -> str:
    """The background colour most of the side columns (0-1, 22-23: nothing of the portrait reaches them) are nearest
    to, either colour of a checkered one counting."""
    cells = np.concatenate([sprite[:, :2], sprite[:, -2:]], axis=1).reshape(-1, 3)
    votes = [nearest(cell, sprites.BACKGROUNDS) for cell in cells]
    return max(set(votes), key=votes.count)


def headwear(sprite: np.ndarray) -> str:
    """The headwear kind whose cells (apart from those hair and outlines cover) take the crown's colour the most,
    against the cells only other kinds paint; "none" when no kind's own cells do, or the crown's colour reaches
    where only an afro does (a bare head or hair)."""
    crown = np.median(sprite[CROWN].reshape(-1, 3), axis=0)
    backdrop = [np.array(sprites.rgb(code)) for code in sprites.BACKGROUNDS[background(sprite)]]
    cells = sprite.astype(float)
    to_crown = np.min([np.abs(cells - crown * f).sum(-1) for f in (1.0, 0.75)], axis=0)  # a band or brim: darker
    to_backdrop = np.min([np.abs(cells - colour).sum(-1) for colour in backdrop], axis=0)
    like = (to_crown < to_backdrop) & (to_crown <= 2 * CLOSE)
    hair_like = np.abs(cells - crown).sum(-1) <= CLOSE  # the crown's own colour, not a shade of it
    if hair_like[AFRO_ONLY_CELLS].mean() >= 0.5:
        return "none"
    every_hat = np.any(list(HAT_CELLS.values()), axis=0)
    scores = {}
    for kind, painted in HAT_CELLS.items():
        own, others = painted & ~HAIR_CELLS, every_hat & ~painted & ~HAIR_CELLS
        scores[kind] = like[own].mean() - like[others].mean()
    best = max(scores, key=scores.__getitem__)
    return best if scores[best] >= 0.5 else "none"


def crown_colour(sprite: np.ndarray, names: dict[str, str]) -> str:
    """The named colour nearest to the crown's (the hat's, or the hair's on a bare head)."""
    crown = np.median(sprite[CROWN].reshape(-1, 3), axis=0)
    return nearest(crown, {name: (code,) for name, code in names.items()})


def glasses(sprite: np.ndarray) -> str:
    row, (left, _), (_, right) = sprites.EYE_ROW, sprites.LEFT_EYE, sprites.RIGHT_EYE
    lenses = sprite[row - 1 : row + 1].astype(int)
    red, blue = lenses[:, slice(*sprites.LEFT_EYE)].mean((0, 1)), lenses[:, slice(*sprites.RIGHT_EYE)].mean((0, 1))
    if red[0] > red[2] + 60 and blue[2] > blue[0] + 60:
        return "3d glasses"
    if has_sunglasses(sprite):
        return "sunglasses"
    frame = sprite[row + 1, left - 1 : right + 1].astype(int)  # below the eyes: skin, or the frames' lower rims
    return "glasses" if (frame.max(-1) < DARK + 20).mean() >= 0.6 else "none"


def has_earring(sprite: np.ndarray) -> bool:
    """A gold cell below the ear, nearer gold than the background."""
    cell = sprite[15, LEFT - 2].astype(int)
    to_gold = np.abs(cell - sprites.rgb("#d4af37")).sum()
    return bool(to_gold <= 2 * CLOSE and nearest(cell, sprites.BACKGROUNDS | {"gold": ("#d4af37",)}) == "gold")


def has_cigarette(sprite: np.ndarray) -> bool:
    """The cigarette's white stick right of the mouth, past the jaw's outline."""
    stick = sprite[sprites.MOUTH_ROW, RIGHT + 1 : RIGHT + 3].astype(int)
    return bool((stick.min(-1) >= 170).all())


def has_sunglasses(sprite: np.ndarray) -> bool:
    """Dark across both eyes and the bridge between them, the whites of the eyes included (glasses keep them)."""
    band = sprite[sprites.EYE_ROW - 1 : sprites.EYE_ROW + 1, sprites.LEFT_EYE[0] : sprites.RIGHT_EYE[1]].astype(int)
    dark = band.max(axis=-1) < DARK
    whites = dark[1, 0] and dark[1, sprites.RIGHT_EYE[0] - sprites.LEFT_EYE[0]]
    return bool(whites) and float(dark.mean()) >= 0.75


def attributes(sprite: np.ndarray) -> dict[str, str | bool]:
    """What a snapped 24x24 sprite shows, read at the generator's fixed layout, as Punk fields and values."""
    worn = headwear(sprite)
    colours = sprites.HAT_COLOURS if worn != "none" else sprites.HAIR_COLOURS
    return {
        "background": background(sprite),
        "headwear": worn,
        "hat_colour" if worn != "none" else "hair_colour": crown_colour(sprite, colours),
        "glasses": glasses(sprite),
        "earring": has_earring(sprite),
        "cigarette": has_cigarette(sprite),
    }


@dataclass(frozen=True)
class Drawn:
    prompt: str
    asked: dict[str, str | bool]
    seed: int
    raw: Image.Image
    sprite: np.ndarray
    is_pixel_art: bool

    @property
    def right(self) -> dict[str, bool]:
        """Per attribute the prompt names: whether the sprite shows it."""
        seen = attributes(self.sprite)
        return {name: seen.get(name) == value for name, value in self.asked.items()}


def draw(settings: Settings, seeds: int) -> list[Drawn]:
    """Every prompt on `seeds` seeds (HELD_OUT_SEED, HELD_OUT_SEED + 1, ...) through the engine the service runs."""
    from service.engine import Engine, GenerationRequest

    engine = Engine.load(settings)
    assert engine.weights.is_demo, "no demo model: is devtools/demo_model in this checkout?"
    requests = [
        GenerationRequest(prompt, seed=HELD_OUT_SEED + start, num_outputs=min(4, seeds - start))
        for prompt, _ in PROMPTS
        for start in range(0, seeds, 4)  # at most 4 images a request
    ]
    asked = dict(PROMPTS)
    return [
        Drawn(
            prompt=request.prompt,
            asked=asked[request.prompt],
            seed=image.seed,
            raw=image.raw,
            sprite=np.asarray(image.art.sprite.convert("RGB")),
            is_pixel_art=image.art.quality.is_pixel_art,
        )
        for request, result in zip(requests, engine.generate_batch(requests), strict=True)
        for image in result.images
    ]


def share(checks: list[bool]) -> float:
    return round(float(np.mean(checks)), 3)


def measure(settings: Settings, seeds: int) -> dict:
    """Pixel-art shares with and without the LoRA (fused at scale 0), and with the LoRA, per attribute the share of
    images that show what their prompt names (background colour, headwear kind, hat colour, hair colour, glasses,
    earring, cigarette), by colour and kind too."""
    start = time.time()
    with_lora = draw(settings, seeds)
    without_lora = draw(Settings(**settings.model_dump() | {"lora_scale": 0.0}), seeds)
    right = [(d, d.right) for d in with_lora]

    def by_value(name: str) -> dict[str, float]:
        values = sorted({str(d.asked[name]) for d, _ in right if name in d.asked})
        return {v: share([r[name] for d, r in right if str(d.asked.get(name)) == v]) for v in values}

    names = sorted({name for _, asked in PROMPTS for name in asked})
    return {
        "seeds": list(range(HELD_OUT_SEED, HELD_OUT_SEED + seeds)),
        "images": len(with_lora),
        "steps": settings.steps,
        "generation_size": settings.generation_size,
        "pixel_art_with_lora": share([d.is_pixel_art for d in with_lora]),
        "pixel_art_without_lora": share([d.is_pixel_art for d in without_lora]),
        "right": {name: share([r[name] for _, r in right if name in r]) for name in names},
        "right_by_value": {name: by_value(name) for name in ("background", "headwear", "hat_colour", "hair_colour")},
        "all_right": share([all(r.values()) for _, r in right]),
        "seen": [{"prompt": d.prompt, "seed": d.seed, **attributes(d.sprite)} for d, _ in right],
        "seconds": round(time.time() - start, 1),
        "drawn": {"with_lora": with_lora, "without_lora": without_lora},
    }


def contact_sheet(result: dict, tile: int = 160, per_row: int = 2) -> Image.Image:
    """Each prompt at its first seed: without the LoRA (raw), with the LoRA (raw), and the snapped sprite; `per_row`
    prompts a row."""
    with_lora, without_lora = result["drawn"]["with_lora"], result["drawn"]["without_lora"]
    seed = min(d.seed for d in with_lora)
    label = 28
    rows = -(-len(PROMPTS) // per_row)
    sheet = Image.new("RGB", (3 * per_row * tile, rows * (tile + label)), "white")
    pen = ImageDraw.Draw(sheet)
    for index, (prompt, _) in enumerate(PROMPTS):
        x, y = (index % per_row) * 3 * tile, (index // per_row) * (tile + label)
        pen.text((x + 6, y + 8), f'"{prompt}" (seed {seed}): no LoRA | LoRA | sprite', fill="black")
        base = next(d for d in without_lora if d.prompt == prompt and d.seed == seed)
        lora = next(d for d in with_lora if d.prompt == prompt and d.seed == seed)
        sprite = Image.fromarray(lora.sprite).resize((tile, tile), Image.Resampling.NEAREST)
        for offset, image in enumerate((base.raw.resize((tile, tile)), lora.raw.resize((tile, tile)), sprite)):
            sheet.paste(image, (x + offset * tile, y + label))
    return sheet


def main() -> None:
    cli = argparse.ArgumentParser(prog="python -m train.demo_eval", description=__doc__.split("\n\n")[0])
    cli.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
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
        "prompts": dict(PROMPTS),
        "command": " ".join(["python -m train.demo_eval", *sys.argv[1:]]),
        "model": [run["folder"] for run in json.loads((DEMO_DIR / DEMO_LOG).read_text())],  # its training runs
    }
    print(json.dumps(numbers, indent=1))
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1) + "\n")
    if args.sheet:
        contact_sheet(result).save(args.sheet)


if __name__ == "__main__":
    main()
