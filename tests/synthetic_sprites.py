"""Deterministic synthetic 24x24 "punk" sprites and the damage a diffusion render does to them.

The tests measure `service.pixelart` against ground truth it cannot get from real model output:
`make_sprite(seed)` is the exact sprite, `degrade(sprite, rng, params)` is what Stable Diffusion
would hand us instead -- an imperfect ~24x24 lattice drawn on a 512x512 canvas.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from skimage.filters import gaussian

GRID = 24
CANVAS = 512
MIN_PALETTE_DISTANCE = 40.0  # RGB distance between any two sprite colours: no near-duplicates

# Colour roles in the order they are admitted: a sprite with n colours uses the first n roles.
BACKGROUND, SKIN, OUTLINE, HAIR, EYES, MOUTH, SHIRT, HAT, EARRING, GLASSES, CIGARETTE, BEARD = range(12)
MIN_COLORS, MAX_COLORS = 5, 12


def distinct_colors(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random RGB colours, pairwise at least MIN_PALETTE_DISTANCE apart (rejection sampling)."""
    colors: list[np.ndarray] = []
    while len(colors) < n:
        candidate = rng.integers(0, 256, size=3)
        if all(np.linalg.norm(candidate - c) >= MIN_PALETTE_DISTANCE for c in colors):
            colors.append(candidate)
    return np.array(colors, dtype=np.uint8)


def _draw_roles(rng: np.random.Generator, n_colors: int) -> np.ndarray:
    """A GRID x GRID map of colour roles: background, head, hair, eyes and the admitted accessories."""

    def has(role: int) -> bool:
        return role < n_colors

    canvas = np.full((GRID, GRID), BACKGROUND)
    top, bottom = rng.integers(5, 8), rng.integers(17, 20)
    left, right = rng.integers(6, 9), rng.integers(15, 18)
    canvas[top:bottom, left:right] = SKIN
    canvas[bottom - 1, left] = canvas[bottom - 1, right - 1] = BACKGROUND  # rounded jaw
    canvas[bottom:, left + 2 : right - 2] = SKIN  # neck
    if has(SHIRT):
        canvas[GRID - 3 :, left - 2 : right + 2] = SHIRT
    if has(BEARD):
        beard = canvas[bottom - 4 : bottom, left:right]
        beard[(beard == SKIN) & (rng.random(beard.shape) < 0.7)] = BEARD
    for col in range(left - 1, right + 1):  # ragged hair line
        canvas[top - 2 : top + rng.integers(0, 3), col] = HAIR
    if has(HAT):
        canvas[max(top - 5, 0) : top - 1, left : right - 1] = HAT
        canvas[top - 2, left - 2 : right + 1] = HAT  # brim
    eye_row, eye_col = top + rng.integers(4, 6), left + 2
    gap = rng.integers(3, 5)
    if has(GLASSES):
        canvas[eye_row, left:right] = GLASSES
        canvas[eye_row - 1, eye_col - 1 : eye_col + gap + 2] = GLASSES
    canvas[eye_row, [eye_col, eye_col + gap]] = EYES
    mouth_row, centre = bottom - 3, (left + right) // 2
    if has(MOUTH):
        canvas[mouth_row, centre - 1 : centre + 1 + rng.integers(0, 2)] = MOUTH
    if has(CIGARETTE):
        canvas[mouth_row, centre + 2 : right + 3] = CIGARETTE
    figure = canvas != BACKGROUND
    near_figure = np.zeros_like(figure)
    near_figure[1:] |= figure[:-1]
    near_figure[:-1] |= figure[1:]
    near_figure[:, 1:] |= figure[:, :-1]
    near_figure[:, :-1] |= figure[:, 1:]
    canvas[near_figure & ~figure] = OUTLINE
    if has(EARRING):
        canvas[eye_row + 3, left - 1] = EARRING
    return canvas


def make_sprite(seed: int) -> Image.Image:
    """A plausible 24x24 punk with 5-12 colours, every colour used, none a near-duplicate of another."""
    rng = np.random.default_rng(seed)
    while True:
        n_colors = int(rng.integers(MIN_COLORS, MAX_COLORS + 1))
        roles = _draw_roles(rng, n_colors)
        if len(np.unique(roles)) == n_colors:  # an accessory may be drawn over completely: retry
            return Image.fromarray(distinct_colors(rng, n_colors)[roles], "RGB")


@dataclass(frozen=True)
class Degradation:
    """How far a render strays from a perfect lattice. `none()` is a clean 512/24 nearest render."""

    offset: tuple[float, float] = (0.0, 0.0)  # lattice shift (x, y) from centred, px
    span: float = CANVAS  # px covered by the 24 cells; the rest is cropped or edge-padded
    breathing: float = 0.0  # each cell width = pitch +- up to this many px (total span kept)
    bend: float = 0.0  # amplitude (px) of a slow sinusoidal bend of the grid lines
    drift: float = 0.0  # amplitude (per channel) of a slow colour gradient over flat areas
    blur: float = 0.0  # Gaussian sigma, px
    noise: float = 0.0  # additive Gaussian noise sigma, per channel
    strays: int = 0  # number of 2x2 specks of random colour
    jpeg_quality: int | None = None  # None: no JPEG round trip

    @classmethod
    def none(cls) -> Degradation:
        return cls()

    @classmethod
    def random(cls, rng: np.random.Generator) -> Degradation:
        """The typical mix of everything a diffusion render does, each within the product's spec."""
        return cls(
            offset=tuple(rng.uniform(-4, 4, size=2)),
            span=rng.uniform(496, 528),
            breathing=rng.uniform(1.0, 2.0),
            bend=rng.uniform(0.0, 1.5),
            drift=rng.uniform(0.0, 6.0),
            blur=rng.uniform(0.5, 1.5),
            noise=rng.uniform(2.0, 6.0),
            strays=int(rng.integers(0, 12)),
            jpeg_quality=int(rng.integers(70, 86)),
        )

    def only(self, **changes) -> Degradation:
        return replace(self, **changes)


def _cell_boundaries(rng: np.random.Generator, start: float, span: float, breathing: float) -> np.ndarray:
    """GRID + 1 boundaries from `start`, widths pitch +- breathing, rescaled to cover exactly `span`."""
    widths = span / GRID + rng.uniform(-breathing, breathing, size=GRID)
    return start + np.concatenate([[0.0], np.cumsum(widths * span / widths.sum())])


def degrade(sprite: Image.Image, rng: np.random.Generator, params: Degradation) -> Image.Image:
    """Render `sprite` onto a CANVAS x CANVAS image the way a diffusion model draws pixel art."""
    source = np.asarray(sprite.convert("RGB"), dtype=np.float64)
    coords = np.arange(CANVAS) + 0.5  # pixel centres
    lattice = []
    for axis in (0, 1):  # x then y
        start = (CANVAS - params.span) / 2 + params.offset[axis]
        bounds = _cell_boundaries(rng, start, params.span, params.breathing)
        phase, period = rng.uniform(0, 2 * np.pi), rng.uniform(300, 700)
        bend = params.bend * np.sin(2 * np.pi * coords / period + phase)  # varies along the other axis
        warped = coords[None, :] - bend[:, None]  # [other axis, this axis]
        # outside the lattice the edge cells continue: same as edge-padding a cropped render
        lattice.append(np.clip(np.searchsorted(bounds, warped, side="right") - 1, 0, GRID - 1))
    cols, rows = lattice[0], lattice[1].T
    image = source[rows, cols]
    ramp = np.linspace(-1, 1, CANVAS)
    for channel in range(3):
        gx, gy = rng.uniform(-1, 1, size=2)
        image[..., channel] += params.drift * (gx * ramp[None, :] + gy * ramp[:, None]) / 2
    if params.blur > 0:
        image = gaussian(image, sigma=params.blur, channel_axis=-1, preserve_range=True)
    image += rng.normal(0, params.noise, size=image.shape) if params.noise > 0 else 0
    for y, x in rng.integers(0, CANVAS - 1, size=(params.strays, 2)):
        image[y : y + 2, x : x + 2] = rng.integers(0, 256, size=3)
    result = Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")
    if params.jpeg_quality is not None:
        buffer = io.BytesIO()
        result.save(buffer, format="JPEG", quality=params.jpeg_quality)
        result = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return result
