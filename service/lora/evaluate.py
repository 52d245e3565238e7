"""`python -m service evaluate`: which LoRA checkpoint (e.g. which epoch) draws the best punks.

The base model is loaded once; each checkpoint is fused in turn through the engine's LoRA switching
(restore the base weights of the LoRA layers, fuse the next file: every module checked, no wrappers left).
Every checkpoint draws the same prompts (service/lora/eval_prompts.txt) with the same seeds.

Per image score, in 0..1 (a weighted mean of the signals that apply):
  0.30 * is_pixel_art (the snapper's verdict: 1 or 0)
  0.20 * grid_fit (share of the variance explained by 24x24 flat cells)
  0.15 * edge_alignment (share of edge energy on the grid lines)
  0.15 * palette (1 for <= 16 colours, falling linearly to 0 at 48, where the verdict calls it a photo)
  0.20 * background (only when the prompt names a background colour: share of the sprite's top row and
         left/right columns whose hue matches it; the weights of the others are rescaled when absent)
A checkpoint's score is the mean over its images; the best checkpoint comes first.
"""

import colorsys
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean, median

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from service.pixelart import MAX_PALETTE_SIZE, QualitySignals

PROMPTS_FILE = Path(__file__).parent / "eval_prompts.txt"
DEFAULT_SEEDS = (42,)
WEIGHTS = {"is_pixel_art": 0.30, "grid_fit": 0.20, "edge_alignment": 0.15, "palette": 0.15, "background": 0.20}
GOOD_PALETTE = 16  # real punks use a handful of colours; up to this many costs nothing
HUE_TOLERANCE = 30 / 360  # a border cell "has the background colour" within this hue distance
MIN_SATURATION = 0.2  # below: achromatic (black/grey/white), compared by brightness instead of hue
VALUE_TOLERANCE = 0.25
TILE, GAP, LABEL_WIDTH, HEADER_HEIGHT = 144, 6, 240, 48  # contact sheet layout (144 = 24 cells x 6 px)
COLOURS = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "gray": (128, 128, 128),
    "silver": (192, 192, 192),
    "red": (210, 40, 40),
    "maroon": (128, 0, 0),
    "brick": (192, 97, 72),
    "orange": (245, 140, 30),
    "yellow": (240, 210, 60),
    "gold": (212, 175, 55),
    "green": (60, 160, 60),
    "lime": (50, 205, 50),
    "olive": (128, 128, 0),
    "teal": (0, 128, 128),
    "cyan": (0, 200, 220),
    "turquoise": (64, 224, 208),
    "blue": (50, 100, 210),
    "navy": (20, 30, 110),
    "purple": (130, 60, 170),
    "violet": (140, 80, 200),
    "magenta": (220, 0, 220),
    "pink": (245, 160, 190),
    "brown": (120, 72, 40),
    "beige": (225, 205, 170),
    "tan": (210, 180, 140),
    "cream": (250, 240, 210),
}
BACKGROUND = re.compile(r"((?:[a-z]+[ -]){0,3})background\b(?:\s*\(\s*(#[0-9a-f]{6})\s*\))?", re.IGNORECASE)


@dataclass(frozen=True)
class ImageScore:
    prompt_index: int
    seed: int
    quality: QualitySignals
    background_target: str | None  # "#rrggbb" the prompt asks for, None when it names no colour
    background: float | None  # share of border cells with that colour
    score: float


@dataclass
class CheckpointScore:
    name: str
    file: str
    images: list[ImageScore] = field(default_factory=list)
    switch_s: float = 0.0
    sprites: dict = field(default_factory=dict, repr=False)  # (prompt index, seed) -> 24x24 sprite

    @property
    def score(self) -> float:
        return mean(i.score for i in self.images)

    def summary(self) -> dict:
        backgrounds = [i.background for i in self.images if i.background is not None]
        return {
            "name": self.name,
            "file": self.file,
            "score": round(self.score, 4),
            "pixel_art": sum(i.quality.is_pixel_art for i in self.images),
            "images": len(self.images),
            "grid_fit": round(mean(i.quality.grid_fit for i in self.images), 4),
            "edge_alignment": round(mean(i.quality.edge_alignment for i in self.images), 4),
            "palette_size_median": median(i.quality.palette_size for i in self.images),
            "background": round(mean(backgrounds), 4) if backgrounds else None,
            "lora_switch_s": round(self.switch_s, 3),
        }


# --- signals ---------------------------------------------------------------------------------------


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    prompts = [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise ValueError(f"prompts: {path} has no prompts")
    return prompts


def background_colour(prompt: str) -> tuple[int, int, int] | None:
    """The colour of '<colour> background' or 'background (#rrggbb)' in the prompt; None if it names none."""
    for match in BACKGROUND.finditer(prompt):
        if code := match.group(2):
            return int(code[1:3], 16), int(code[3:5], 16), int(code[5:7], 16)
        for word in reversed(re.split(r"[ -]+", match.group(1).lower())):
            if word in COLOURS:
                return COLOURS[word]
    return None


def background_adherence(sprite: Image.Image, target: tuple[int, int, int]) -> float:
    """Share of the sprite's top row and left/right columns (where a punk portrait shows background;
    the bottom row is the shirt) whose colour matches `target`: same hue within HUE_TOLERANCE for a
    colourful target, similar brightness for black/grey/white."""
    cells = np.asarray(sprite.convert("RGB"), dtype=np.float64) / 255
    border = np.concatenate([cells[0], cells[1:-1, 0], cells[1:-1, -1]])
    hue, saturation, value = colorsys.rgb_to_hsv(*(np.array(target) / 255))
    hsv = np.array([colorsys.rgb_to_hsv(*cell) for cell in border])
    if saturation < MIN_SATURATION:
        close = (hsv[:, 1] < MIN_SATURATION + 0.05) & (np.abs(hsv[:, 2] - value) <= VALUE_TOLERANCE)
    else:
        distance = np.abs(hsv[:, 0] - hue)
        distance = np.minimum(distance, 1 - distance)
        close = (hsv[:, 1] >= MIN_SATURATION) & (hsv[:, 2] >= 0.2) & (distance <= HUE_TOLERANCE)
    return float(close.mean())


def image_score(quality: QualitySignals, background: float | None) -> float:
    palette = float(np.clip((MAX_PALETTE_SIZE - quality.palette_size) / (MAX_PALETTE_SIZE - GOOD_PALETTE), 0, 1))
    parts = {
        "is_pixel_art": float(quality.is_pixel_art),
        "grid_fit": quality.grid_fit,
        "edge_alignment": quality.edge_alignment,
        "palette": palette,
        "background": background,
    }
    used = {k: v for k, v in parts.items() if v is not None}
    return sum(WEIGHTS[k] * v for k, v in used.items()) / sum(WEIGHTS[k] for k in used)


# --- running ---------------------------------------------------------------------------------------


def checkpoint_names(paths: list[Path]) -> dict[str, Path]:
    """Unique display names: the file stem, with the folder in front where two stems clash."""
    stems = [p.stem for p in paths]
    names = {}
    for path in paths:
        name = path.stem if stems.count(path.stem) == 1 else f"{path.parent.name}/{path.stem}"
        while name in names:
            name += "'"
        names[name] = path
    return names


def evaluate(
    engine,
    checkpoints: dict[str, Path],
    prompts: list[str],
    seeds: list[int],
    steps: int | None,
    out: Path,
    show_progress: bool = True,
) -> list[CheckpointScore]:
    """Generate every prompt x seed with every checkpoint; returns them best first. Writes sprites/."""
    from service.engine import GenerationRequest

    per_checkpoint = len(prompts) * len(seeds)
    results = []
    with tqdm(total=len(checkpoints) * per_checkpoint, unit="img", desc="evaluating", disable=not show_progress) as bar:
        for index, (name, path) in enumerate(checkpoints.items()):
            requests = [
                GenerationRequest(p, seed=s, num_inference_steps=steps, lora=name) for p in prompts for s in seeds
            ]

            def progress(done: int, total: int, base: int = index * per_checkpoint) -> None:
                bar.n = base + int(per_checkpoint * done / total)
                bar.refresh()

            generated = engine.generate_batch(requests, progress)
            scored = CheckpointScore(name=name, file=str(path), switch_s=generated[0].timings.get("lora_switch_s", 0.0))
            folder = out / "sprites" / _safe(name)
            folder.mkdir(parents=True, exist_ok=True)
            for request, result in zip(requests, generated, strict=True):
                art = result.images[0].art
                prompt_index = prompts.index(request.prompt)
                target = background_colour(request.prompt)
                adherence = None if target is None else background_adherence(art.sprite, target)
                art.sprite.save(folder / f"p{prompt_index + 1}-s{request.seed}.png")
                scored.images.append(
                    ImageScore(
                        prompt_index=prompt_index,
                        seed=result.images[0].seed,  # the request's seed: it was given, and there is one image
                        quality=art.quality,
                        background_target=None if target is None else "#{:02x}{:02x}{:02x}".format(*target),
                        background=adherence,
                        score=image_score(art.quality, adherence),
                    )
                )
            scored.sprites = {
                (i.prompt_index, i.seed): r.images[0].art.sprite for i, r in zip(scored.images, generated, strict=True)
            }
            results.append(scored)
            bar.n = (index + 1) * per_checkpoint
            bar.set_postfix_str(f"{name}: {scored.score:.3f}")
    return results


# --- outputs ---------------------------------------------------------------------------------------


def tile_box(row: int, column: int) -> tuple[int, int, int, int]:
    """Where the tile of checkpoint `row`, prompt x seed `column` sits on the contact sheet."""
    left, top = LABEL_WIDTH + column * (TILE + GAP), HEADER_HEIGHT + row * (TILE + GAP)
    return left, top, left + TILE, top + TILE


def contact_sheet(results: list[CheckpointScore], prompts: list[str], seeds: list[int]) -> Image.Image:
    """One row per checkpoint (in the given order, labelled with its rank and score), one column per prompt x seed."""
    columns = [(p, s) for p in range(len(prompts)) for s in seeds]
    width, height = tile_box(len(results) - 1, len(columns) - 1)[2:]
    sheet = Image.new("RGB", (width + GAP, height + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    ranks = {r.name: rank for rank, r in enumerate(sorted(results, key=lambda r: -r.score), start=1)}
    for column, (prompt, seed) in enumerate(columns):
        left = tile_box(0, column)[0]
        draw.text((left, 4), _fit(draw, font, f"{prompt + 1}. {prompts[prompt]}", TILE), fill="black", font=font)
        draw.text((left, 22), f"seed {seed}", fill="black", font=font)
    for row, result in enumerate(results):
        top = tile_box(row, 0)[1]
        lines = [
            f"#{ranks[result.name]} {result.name}",
            f"score {result.score:.3f}",
            f"pixel art {result.summary()['pixel_art']}/{len(result.images)}",
        ]
        for line_index, line in enumerate(lines):
            draw.text((6, top + 4 + 18 * line_index), _fit(draw, font, line, LABEL_WIDTH - 12), fill="black", font=font)
        for column, key in enumerate(columns):
            sprite = result.sprites[key].convert("RGB")
            sheet.paste(sprite.resize((TILE, TILE), Image.Resampling.NEAREST), tile_box(row, column)[:2])
    return sheet


def ranking(results: list[CheckpointScore]) -> list[dict]:
    ranked = sorted(results, key=lambda r: -r.score)
    return [{"rank": rank} | r.summary() for rank, r in enumerate(ranked, start=1)]


def ranking_markdown(rows: list[dict]) -> str:
    lines = [
        "| rank | checkpoint | score | pixel art | grid fit | edge alignment | palette (median) | background | file |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        background = "n/a" if r["background"] is None else f"{r['background']:.2f}"
        lines.append(
            f"| {r['rank']} | {r['name']} | {r['score']:.3f} | {r['pixel_art']}/{r['images']} | {r['grid_fit']:.3f} "
            f"| {r['edge_alignment']:.3f} | {r['palette_size_median']:g} | {background} | {r['file']} |"
        )
    return "\n".join(lines)


def write_outputs(
    results: list[CheckpointScore], prompts: list[str], seeds: list[int], steps: int, out: Path, smoke: bool
) -> dict[str, Path]:
    rows = ranking(results)
    paths = {"sheet": out / "contact_sheet.png", "markdown": out / "ranking.md", "json": out / "ranking.json"}
    contact_sheet(results, prompts, seeds).save(paths["sheet"])
    note = "\n\n**SMOKE MODEL: random weights, the ranking is meaningless.**" if smoke else ""
    paths["markdown"].write_text(ranking_markdown(rows) + note + "\n\nScore: see service/lora/evaluate.py.\n")
    details = {
        "score": {
            "weights": WEIGHTS,
            "good_palette": GOOD_PALETTE,
            "max_palette": MAX_PALETTE_SIZE,
            "formula": "weighted mean of the signals that apply per image; checkpoint = mean of its images",
        },
        "smoke_model": smoke,
        "prompts": prompts,
        "seeds": seeds,
        "steps": steps,
        "ranking": rows,
        "images": {r.name: [asdict(i) for i in r.images] for r in results},
    }
    paths["json"].write_text(json.dumps(details, indent=2) + "\n")
    return paths


def _fit(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# --- command line ------------------------------------------------------------------------------------


def add_command(commands) -> None:
    parser = commands.add_parser("evaluate", help="rank LoRA checkpoints on fixed prompts and seeds; contact sheet")
    parser.add_argument(
        "--loras",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="checkpoints to compare (default: the configured LoRA and those in the LoRA folder)",
    )
    parser.add_argument("--prompts", type=Path, default=PROMPTS_FILE, help="one description per line (# comments)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--steps", type=int, help="denoising steps (default PUNKS_STEPS)")
    parser.add_argument("--out", type=Path, default=Path("out/evaluate"), help="folder for sheet, tables, sprites")
    parser.set_defaults(run=run)


def run(args) -> int:
    from service.config import Settings
    from service.engine import Engine
    from service.lora.switch import find_loras
    from service.weights.resolve import resolve_weights

    settings = Settings()
    prompts = load_prompts(args.prompts)
    if args.loras:
        missing = [str(p) for p in args.loras if not p.is_file()]
        if missing:
            raise ValueError(f"loras: not found: {', '.join(missing)}")
        checkpoints = checkpoint_names(args.loras)
    else:  # the configured LoRA and every LoRA in the folder
        checkpoints = {"default": resolve_weights(settings).lora} | find_loras(settings.loras_path())
    engine = Engine.load(settings, loras=checkpoints)
    args.out.mkdir(parents=True, exist_ok=True)
    results = evaluate(engine, checkpoints, prompts, args.seeds, args.steps, args.out)
    steps = args.steps if args.steps is not None else settings.steps
    paths = write_outputs(results, prompts, args.seeds, steps, args.out, engine.weights.is_smoke)
    print(ranking_markdown(ranking(results)))
    for path in paths.values():
        print(path)
    if engine.weights.is_smoke:
        print("warning: made with the random SMOKE model, the ranking is not meaningful", file=sys.stderr)
    return 0
