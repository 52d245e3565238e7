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
    drift_waves: int = 0  # slow 2-D cosine waves added to the drift's ramp (peak still `drift`)

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

    @classmethod
    def severe(cls, rng: np.random.Generator) -> Degradation:
        """Issue 18's harder mix: cells 19-23 px, grid lines bent by up to +-6 px, blur sigma 0.6-1.8 px,
        noise sigma 4-10, JPEG quality 65-95 and a smooth (not only linear) colour drift of up to +-10."""
        return cls(
            offset=tuple(rng.uniform(-4, 4, size=2)),
            span=rng.uniform(496, 528),
            breathing=2.0,
            bend=rng.uniform(0.0, 6.0),
            drift=rng.uniform(5.0, 10.0),
            drift_waves=2,
            blur=rng.uniform(0.6, 1.8),
            noise=rng.uniform(4.0, 10.0),
            strays=int(rng.integers(0, 12)),
            jpeg_quality=int(rng.integers(65, 96)),
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
        field = (gx * ramp[None, :] + gy * ramp[:, None]) / 2
        if params.drift_waves:
            for _ in range(params.drift_waves):
                (kx, ky), phase = rng.normal(size=2) * np.pi / 2, rng.uniform(0, 2 * np.pi)
                field = field + rng.uniform(0.3, 1.0) * np.cos(kx * ramp[None, :] + ky * ramp[:, None] + phase)
            field = field / np.abs(field).max()  # smooth, peak +-1
        image[..., channel] += params.drift * field
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


# --- punk-like portraits with one-cell details (issue 18) -----------------------------------------

PUNK_MIN_COLORS, PUNK_MAX_COLORS = 4, 16
WHITE = (255, 255, 255)
SHADE_GAP = (15.0, 30.0)  # RGB distance of a "close dark shade" from the colour it shades
MIN_SHADE_SEPARATION = 30.0  # a shade's distance from every colour other than the one it shades


def _dilate(mask: np.ndarray, diagonal: bool = False) -> np.ndarray:
    """mask grown by one cell in the 4 (or, with the diagonals, 8) directions."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    sideways = grown.copy() if diagonal else mask  # grow the grown rows sideways: the corners too
    grown[:, 1:] |= sideways[:, :-1]
    grown[:, :-1] |= sideways[:, 1:]
    return grown


def _punk_layout(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, list[int]]]:
    """A GRID x GRID map of part ids and, per part name, its ids. Parts are what gets a colour:
    background (flat or a one-cell checker), skin, outline, hair or hat, one-cell eyes and highlights,
    a two-cell mouth, and optional accessories."""
    names: list[str] = []

    def part(name: str) -> int:
        names.append(name)
        return len(names) - 1

    background = part("background")
    canvas = np.full((GRID, GRID), background)
    if rng.random() < 0.4:
        canvas[np.indices((GRID, GRID)).sum(axis=0) % 2 == 1] = part("background")
    skin = part("skin")
    top, bottom = rng.integers(5, 8), rng.integers(17, 20)
    left, right = rng.integers(6, 9), rng.integers(15, 18)
    canvas[top:bottom, left:right] = skin
    canvas[bottom - 1, left] = canvas[bottom - 1, right - 1] = background  # rounded jaw
    canvas[bottom:, left + 2 : right - 2] = skin  # neck
    if rng.random() < 0.7:
        canvas[GRID - 3 :, left - 2 : right + 2] = part("shirt")
        if rng.random() < 0.5:
            canvas[GRID - 3, left + 1 : right - 1] = part("collar")
    if rng.random() < 0.3:
        beard = canvas[bottom - 4 : bottom, left:right]
        beard[(beard == skin) & (rng.random(beard.shape) < 0.7)] = part("beard")
    if rng.random() < 0.35:
        hat = part("hat")
        canvas[max(top - 5, 0) : top - 1, left : right - 1] = hat
        canvas[top - 2, left - 2 : right + 1] = hat  # brim
        canvas[top - 3, (left + right) // 2] = part("highlight")  # one-cell badge
    else:
        hair = part("hair")
        for col in range(left - 1, right + 1):  # ragged hair line
            canvas[top - 2 : top + rng.integers(0, 3), col] = hair
        if rng.random() < 0.5:
            canvas[top - 2, left + 1] = part("highlight")  # one-cell shine
        if rng.random() < 0.3:
            canvas[top - 2 : top + 1, right - 3] = part("streak")  # one cell wide
    eye_row, eye_col = top + rng.integers(4, 6), left + 2
    gap = rng.integers(3, 5)
    if rng.random() < 0.25:
        glasses = part("glasses")
        canvas[eye_row, left:right] = glasses
        canvas[eye_row - 1, eye_col - 1 : eye_col + gap + 2] = glasses
    eyes = part("eyes")
    canvas[eye_row, [eye_col, eye_col + gap]] = eyes
    if rng.random() < 0.5:  # one-cell eye whites (or other glints) next to each pupil
        canvas[eye_row, [eye_col + 1, eye_col + gap + 1]] = part("eye whites")
    if rng.random() < 0.4:
        canvas[eye_row + 2, eye_col + gap // 2 + 1] = part("nose")
    if rng.random() < 0.3:
        canvas[eye_row + 2, [left, right - 1]] = part("blush")
    mouth_row, centre = bottom - 3, (left + right) // 2
    canvas[mouth_row, centre - 1 : centre + 1] = part("mouth")  # two cells
    if rng.random() < 0.3:
        canvas[mouth_row, centre + 2 : right + 2] = part("cigarette")
        canvas[mouth_row, right + 2] = part("ember")
    figure = canvas != background
    if names.count("background") == 2:
        figure &= canvas != background + 1
    canvas[_dilate(figure) & ~figure] = part("outline")
    if rng.random() < 0.4:
        canvas[eye_row + 3, left - 1] = part("earring")
    parts: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        parts.setdefault(name, []).append(index)
    return canvas, parts


def _touching(canvas: np.ndarray, a: int, b: int) -> bool:
    """Whether parts a and b are 8-neighbours anywhere: then their colours are not spatially separate."""
    return bool(np.any(_dilate(canvas == a, diagonal=True) & (canvas == b)))


def _dark_shade(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A colour SHADE_GAP away from `base`, inside the RGB cube."""
    while True:
        direction = rng.normal(size=3)
        candidate = np.rint(base + direction / np.linalg.norm(direction) * rng.uniform(*SHADE_GAP))
        gap = np.linalg.norm(candidate - base)
        if np.all((candidate >= 0) & (candidate <= 255)) and SHADE_GAP[0] <= gap <= SHADE_GAP[1]:
            return candidate


def make_punk(seed: int) -> Image.Image:
    """A punk-like 24x24 portrait with 4-16 colours and the details that make a punk a punk: one-cell
    eyes and highlights (often pure white), a two-cell mouth, outlines, flat or checkered backgrounds,
    and in most sprites a pair of close dark shades (15-30 RGB apart) that never touch. All other
    colour pairs are at least MIN_PALETTE_DISTANCE apart."""
    rng = np.random.default_rng(seed)
    while True:
        canvas, parts = _punk_layout(rng)
        n_parts = int(canvas.max()) + 1
        n_colors = min(n_parts, int(rng.integers(PUNK_MIN_COLORS, PUNK_MAX_COLORS + 1)))
        # parts beyond n_colors reuse the colour of a part that keeps its own (background, skin, outline, eyes)
        keep = [parts[name][0] for name in ("background", "skin", "outline", "eyes")]
        colour_of = np.arange(n_parts)
        optional = [index for index in range(n_parts) if index not in keep]
        for index in rng.permutation(optional)[: n_parts - n_colors]:
            colour_of[index] = rng.choice(keep[1:])
        colour_ids = np.unique(colour_of)
        colours: dict[int, np.ndarray] = {}
        if rng.random() < 0.6:  # pure white: eye whites, highlight or ember, whichever exists
            for name in ("eye whites", "highlight", "ember", "eyes"):
                if name in parts and colour_of[parts[name][0]] not in colours:
                    colours[int(colour_of[parts[name][0]])] = np.array(WHITE, dtype=float)
                    break
        pairs = [
            (int(colour_of[parts[a][0]]), int(colour_of[parts[b][0]]))
            for a, b in (("hair", "eyes"), ("outline", "mouth"), ("hat", "eyes"), ("beard", "glasses"))
            if a in parts and b in parts
        ]
        shaded: list[tuple[int, int]] = []
        for a, b in pairs:
            free = a != b and a not in colours and b not in colours
            if free and rng.random() < 0.8 and not _touching(colour_of[canvas], a, b):
                colours[a] = rng.integers(15, 110, size=3).astype(float)  # a dark colour
                colours[b] = _dark_shade(rng, colours[a])
                shaded.append((a, b))
        others = [c for c in colour_ids if c not in colours]
        fixed = np.array(list(colours.values())).reshape(-1, 3)
        sampled = _colours_away_from(rng, fixed, len(others))
        if sampled is None:
            continue
        colours.update(zip(others, sampled, strict=True))
        palette = np.array([colours[c] for c in colour_ids])
        gaps = np.linalg.norm(palette[:, None] - palette[None, :], axis=-1)
        np.fill_diagonal(gaps, np.inf)
        index_of = {c: i for i, c in enumerate(colour_ids)}
        for a, b in shaded:
            gaps[index_of[a], index_of[b]] = gaps[index_of[b], index_of[a]] = np.inf
        if gaps.min() < MIN_SHADE_SEPARATION:
            continue
        lookup = np.zeros((n_parts, 3), dtype=np.uint8)
        for index in range(n_parts):
            lookup[index] = colours[int(colour_of[index])]
        return Image.fromarray(lookup[canvas], "RGB")


def _colours_away_from(rng: np.random.Generator, fixed: np.ndarray, n: int) -> list[np.ndarray] | None:
    """n random colours at least MIN_PALETTE_DISTANCE from each other and from `fixed` (None: gave up)."""
    chosen: list[np.ndarray] = list(fixed)
    for _ in range(2000):
        if len(chosen) == len(fixed) + n:
            return chosen[len(fixed) :]
        candidate = rng.integers(0, 256, size=3).astype(float)
        if all(np.linalg.norm(candidate - c) >= MIN_PALETTE_DISTANCE for c in chosen):
            chosen.append(candidate)
    return None


def severe_punk(seed: int) -> tuple[Image.Image, Image.Image, Degradation]:
    """(truth, 512 render, its degradation): `make_punk(seed)` rendered with `Degradation.severe`."""
    truth = make_punk(seed)
    rng = np.random.default_rng(seed)
    params = Degradation.severe(rng)
    return truth, degrade(truth, rng, params), params
