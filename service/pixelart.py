"""Turn a diffusion render (~512x512) into a true grid x grid pixel-art sprite and its upscale.

Stable Diffusion never draws a perfect lattice: cells breathe (19-23 px instead of 21.3), lines
bend, the grid is shifted and spans a little more or less than the canvas, flat areas drift in
colour and edges are soft and JPEG-like. We *know* the grid size, so instead of guessing it we fit
exactly `grid` cells per axis:

1. edge profile: per axis, how much colour changes between adjacent columns (rows);
2. global lattice: the (pitch, start) whose grid + 1 lines collect the most edge energy;
3. local refinement: dynamic programming moves every line a few px onto the nearest edge while
   keeping cell widths plausible -- so breathing cells are followed, and where a line has no
   edge at all (flat background) it simply stays on the global lattice;
4. one colour per cell: per-channel median of samples from the cell's interior (edges are blurred);
5. palette cleaning: near-identical cell colours are merged so a flat area is exactly one colour.

Pure numpy + Pillow (no torch, no scipy) and a few milliseconds per image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

# --- lattice search (lengths are fractions of the nominal pitch = image side / grid) ---------
PITCH_TOLERANCE = 0.05  # spec: the 24 cells span 496-528 px of 512 (+-3.1%)
PITCH_STEPS = 81
START_STEPS = 41  # lattice start searched over +-half a cell around "grid centred in the image"
LINE_SEARCH_RADIUS = 0.4  # a line may leave the global lattice by this much to follow breathing
MAX_WIDTH_CHANGE = 0.25  # no cell is more than this much narrower/wider than the pitch
LATTICE_PULL = 0.2  # cost (in units of a typical edge) of moving a line a full radius off-lattice
WIDTH_STIFFNESS = 0.2  # cost of a cell at the width limit; keeps edgeless lines evenly spread
POOL_FRACTION = 1 / 3  # differences are summed over runs this long before abs(): noise cancels

# --- cell colours and palette -----------------------------------------------------------------
CELL_SAMPLES = 8  # samples per axis per cell (8x8 = 64 samples) for the median
INTERIOR_MARGIN = 0.2  # skip this share of the cell on each side: blurred edges live there
MERGE_DISTANCE = 24.0  # RGB distance below which two cell colours are "the same" colour

# --- verdict ------------------------------------------------------------------------------------
MIN_GRID_FIT = 0.85  # share of variance the cell-constant image must explain
MIN_EDGE_ALIGNMENT = 0.6  # share of edge energy that must sit on the detected grid lines
MAX_PALETTE_SIZE = 48  # more colours than this after cleaning is a photo, not pixel art
ALIGNMENT_RADIUS = 0.15  # "on a line" = within this fraction of a pitch


@dataclass(frozen=True)
class QualitySignals:
    grid_fit: float  # 0..1: share of the image's variance explained by cell-constant colours
    palette_size: int  # colours in the cleaned sprite
    is_pixel_art: bool  # the verdict, see `_is_pixel_art`
    edge_alignment: float  # 0..1: share of edge energy lying on the detected grid lines

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PixelArt:
    sprite: Image.Image  # grid x grid RGB
    image: Image.Image  # nearest-neighbour upscale of `sprite`
    palette: list[str]  # '#rrggbb', most frequent first
    quality: QualitySignals


def _is_pixel_art(grid_fit: float, edge_alignment: float, palette_size: int) -> bool:
    """One place for the verdict. grid_fit alone is not enough: a smooth photo is also mostly
    explained by 24x24 cell means. Pixel art additionally has its edges *on* the grid lines
    (a photo's edges are everywhere) and a small palette."""
    return (
        grid_fit >= MIN_GRID_FIT
        and edge_alignment >= MIN_EDGE_ALIGNMENT
        and palette_size <= MAX_PALETTE_SIZE
    )


# --- input ----------------------------------------------------------------------------------------


def _rgb_array(image: Image.Image, grid: int) -> np.ndarray:
    """float32 HxWx3 array. Transparency is flattened onto white; tiny images are refused because
    a cell needs at least 2 px to have an interior distinct from its edges."""
    if grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid}")
    width, height = image.size
    if min(width, height) < 2 * grid:
        raise ValueError(
            f"image is {width}x{height} px, too small for a {grid}x{grid} grid: "
            f"need at least {2 * grid}x{2 * grid} px (2 px per cell)"
        )
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return np.asarray(image.convert("RGB"), dtype=np.float32)


# --- grid detection -------------------------------------------------------------------------------


def edge_profiles(rgb: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Edge energy at every column (x) and row (y) boundary position 0..W, where position p is the
    edge between pixel p-1 and p. Differences are summed over short runs along the line before
    taking abs(): pixel noise cancels, real cell edges (a whole cell long) add up. The median is
    subtracted so flat-but-noisy areas and the (edgeless) area outside the image score alike."""

    def profile(a: np.ndarray) -> np.ndarray:  # profile over axis 1 of an (L, W, 3) array
        run = max(1, int(a.shape[0] / grid * POOL_FRACTION))
        diffs = np.add.reduceat(np.diff(a, axis=1), np.arange(0, a.shape[0], run), axis=0)
        energy = np.abs(diffs).sum(axis=(0, 2))
        energy = np.maximum(energy - np.median(energy), 0)
        return np.concatenate([[0.0], energy, [0.0]])

    return profile(rgb), profile(rgb.transpose(1, 0, 2))


def _energy_at(profile: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Profile value at integer positions; 0 outside the image (a line there shows no edge)."""
    inside = (positions > 0) & (positions < len(profile) - 1)
    return np.where(inside, profile[np.clip(positions, 0, len(profile) - 1)], 0.0)


def _global_lattice(profile: np.ndarray, grid: int) -> tuple[float, float]:
    """(start, pitch) of the regular lattice whose grid + 1 lines collect the most edge energy.
    The grid is assumed roughly centred (+-half a cell); a tiny prior towards the nominal lattice
    breaks ties on images without edges. A line outside the image or on its border shows no
    edge and is not counted."""
    length = len(profile) - 1
    nominal = length / grid
    pitches = nominal * np.linspace(1 - PITCH_TOLERANCE, 1 + PITCH_TOLERANCE, PITCH_STEPS)
    shifts = np.linspace(-0.5, 0.5, START_STEPS)
    starts = (length - grid * pitches[:, None]) / 2 + shifts[None, :] * pitches[:, None]
    lines = starts[..., None] + np.arange(grid + 1) * pitches[:, None, None]
    # a slightly widened profile tolerates lines that breathe away from the regular lattice
    smooth = np.convolve(profile, np.ones(5) / 5, mode="same")
    positions = np.rint(lines).astype(int)
    visible = ((positions > 0) & (positions < length)).sum(axis=-1)
    # mean, not sum, over visible lines: more lines inside the image must not win by number alone
    score = _energy_at(smooth, positions).sum(axis=-1) / visible
    prior = np.abs(shifts)[None, :] + np.abs(pitches / nominal - 1)[:, None]
    score = score - 1e-3 * (smooth.mean() + 1.0) * prior
    best_pitch, best_shift = np.unravel_index(np.argmax(score), score.shape)
    return float(starts[best_pitch, best_shift]), float(pitches[best_pitch])


def _refine_lines(profile: np.ndarray, start: float, pitch: float, grid: int) -> np.ndarray:
    """Move each lattice line onto the strongest nearby edge, jointly for all lines (Viterbi):
    score = edge energy at the lines - pull back to the lattice - cost of uneven cell widths,
    with every cell keeping at least one pixel inside the image."""
    length = len(profile) - 1
    radius = max(1, int(LINE_SEARCH_RADIUS * pitch))
    lattice = np.rint(start + pitch * np.arange(grid + 1)).astype(int)
    offsets = np.arange(-radius, radius + 1)
    candidates = lattice[:, None] + offsets[None, :]  # (grid + 1, K)
    typical_edge = _energy_at(profile, lattice).mean() + 1e-9
    unary = _energy_at(profile, candidates) / typical_edge - LATTICE_PULL * (offsets / radius) ** 2
    unary[1, candidates[1] < 1] = -np.inf
    unary[grid - 1, candidates[grid - 1] > length - 1] = -np.inf
    widths = candidates[1:, None, :] - candidates[:-1, :, None]  # (grid, K_prev, K_next)
    stretch = (widths - pitch) / max(1.0, MAX_WIDTH_CHANGE * pitch)
    pairwise = np.where(np.abs(stretch) <= 1, -WIDTH_STIFFNESS * stretch**2, -np.inf)

    value, back = unary[0], []
    for i in range(grid):
        total = value[:, None] + pairwise[i]
        back.append(np.argmax(total, axis=0))
        value = total[back[-1], np.arange(len(offsets))] + unary[i + 1]
    choice = [int(np.argmax(value))]
    for pointers in reversed(back):
        choice.append(int(pointers[choice[-1]]))
    return candidates[np.arange(grid + 1), choice[::-1]]


def find_grid_lines(rgb: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """grid + 1 cell boundaries per axis (xs, ys). Outer ones may lie outside the image when the
    drawn grid runs off the canvas; every cell keeps at least one pixel inside."""
    return _lines_from_profiles(edge_profiles(rgb, grid), grid)


def _lines_from_profiles(profiles: tuple[np.ndarray, np.ndarray], grid: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = (_refine_lines(p, *_global_lattice(p, grid), grid) for p in profiles)
    return xs, ys


# --- cells and palette ----------------------------------------------------------------------------


def _interior_samples(lines: np.ndarray, length: int) -> np.ndarray:
    """(grid, CELL_SAMPLES) pixel indices spread over each cell's visible interior."""
    lo, hi = np.clip(lines[:-1], 0, length), np.clip(lines[1:], 0, length)
    spread = INTERIOR_MARGIN + (1 - 2 * INTERIOR_MARGIN) * (np.arange(CELL_SAMPLES) + 0.5) / CELL_SAMPLES
    positions = np.floor(lo[:, None] + (hi - lo)[:, None] * spread[None, :]).astype(int)
    return np.clip(positions, lo[:, None], hi[:, None] - 1)


def cell_colors(rgb: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(rows, cols, 3) float colour per cell: per-channel median of its interior samples, which
    ignores blurred edges, noise and stray pixels."""
    px = _interior_samples(xs, rgb.shape[1])
    py = _interior_samples(ys, rgb.shape[0])
    samples = rgb[py[:, :, None, None], px[None, None, :, :]]  # (rows, S, cols, S, 3)
    return np.median(samples, axis=(1, 3))


def clean_palette(colors: np.ndarray, max_colors: int | None = None) -> np.ndarray:
    """Map every colour of an (N, 3) array onto a clean palette; returns (N, 3) uint8.

    Seeds: the densest colour and everything within MERGE_DISTANCE/2 of it, repeatedly.
    Then the closest pair of clusters (count-weighted centroids) is merged while closer than
    MERGE_DISTANCE, or while more than `max_colors` remain -- so one flat area becomes exactly
    one colour, and `max_colors` is met by giving up the least distinct colours first."""
    distances = np.linalg.norm(colors[:, None] - colors[None, :], axis=-1)
    density = (distances < MERGE_DISTANCE / 2).sum(axis=1)
    labels = np.full(len(colors), -1)
    while (unassigned := labels < 0).any():
        seed = np.flatnonzero(unassigned)[np.argmax(density[unassigned])]
        labels[unassigned & (distances[seed] < MERGE_DISTANCE / 2)] = seed
    clusters = {seed: np.flatnonzero(labels == seed) for seed in np.unique(labels)}

    limit = max_colors if max_colors is not None else len(clusters)
    while len(clusters) > 1:
        keys = list(clusters)
        centres = np.array([colors[clusters[k]].mean(axis=0) for k in keys])
        gaps = np.linalg.norm(centres[:, None] - centres[None, :], axis=-1)
        np.fill_diagonal(gaps, np.inf)
        a, b = np.unravel_index(np.argmin(gaps), gaps.shape)
        if gaps[a, b] >= MERGE_DISTANCE and len(clusters) <= limit:
            break
        clusters[keys[a]] = np.concatenate([clusters[keys[a]], clusters.pop(keys[b])])

    cleaned = np.empty((len(colors), 3), dtype=np.uint8)
    for members in clusters.values():
        cleaned[members] = np.clip(np.rint(colors[members].mean(axis=0)), 0, 255)
    return cleaned


def _sprite(rgb: np.ndarray, xs: np.ndarray, ys: np.ndarray, max_colors: int | None) -> Image.Image:
    colors = cell_colors(rgb, xs, ys)
    cleaned = clean_palette(colors.reshape(-1, 3), max_colors).reshape(colors.shape)
    return Image.fromarray(cleaned, "RGB")


def snap_to_grid(image: Image.Image, grid: int = 24, max_colors: int | None = None) -> Image.Image:
    """The grid x grid RGB sprite hidden in `image`, one clean palette colour per cell."""
    _check_max_colors(max_colors)
    rgb = _rgb_array(image, grid)
    return _sprite(rgb, *find_grid_lines(rgb, grid), max_colors)


def _check_max_colors(max_colors: int | None) -> None:
    if max_colors is not None and max_colors < 1:
        raise ValueError(f"max_colors must be at least 1, got {max_colors}")


# --- output ---------------------------------------------------------------------------------------


def upscale(sprite: Image.Image, size: int = 1024, integer_scale: bool = False) -> Image.Image:
    """Nearest-neighbour upscale with every cell a flat block.

    size is rarely a multiple of the grid (1024 / 24 = 42.67), so by default cell i spans
    round(i * size / grid) .. round((i + 1) * size / grid): cells are 42 or 43 px and the image is
    exactly size x size (what the product promises). integer_scale=True instead makes every cell
    exactly size // grid px (42 for 24 -> 1008 x 1008), for consumers who need a uniform scale.
    """
    cols, rows = sprite.size
    if size < max(cols, rows):
        raise ValueError(f"size {size} is smaller than the {cols}x{rows} sprite")
    pixels = np.asarray(sprite.convert("RGB"))

    def source_index(cells: int) -> np.ndarray:
        if integer_scale:
            return np.repeat(np.arange(cells), size // cells)
        edges = np.floor(np.arange(cells + 1) * size / cells + 0.5)
        return np.searchsorted(edges, np.arange(size), side="right") - 1

    return Image.fromarray(pixels[source_index(rows)][:, source_index(cols)], "RGB")


def palette_hex(sprite: Image.Image) -> list[str]:
    """The sprite's colours as '#rrggbb', most frequent first (ties: by colour, for stability)."""
    colors, counts = np.unique(np.asarray(sprite.convert("RGB")).reshape(-1, 3), axis=0, return_counts=True)
    order = np.lexsort((colors[:, 2], colors[:, 1], colors[:, 0], -counts))
    return ["#{:02x}{:02x}{:02x}".format(*colors[i]) for i in order]


# --- quality --------------------------------------------------------------------------------------


def _grid_fit(rgb: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> float:
    """1 - SS_within_cells / SS_total (channels summed). Pixels outside the grid count towards
    the nearest edge cell. A perfectly flat image is trivially cell-constant: 1.0."""
    height, width = rgb.shape[:2]
    col_starts = np.concatenate([[0], np.clip(xs[1:-1], 1, width - 1)])
    row_starts = np.concatenate([[0], np.clip(ys[1:-1], 1, height - 1)])
    values = rgb.astype(np.float64)
    sums = np.add.reduceat(np.add.reduceat(values, row_starts, axis=0), col_starts, axis=1)
    counts = np.outer(np.diff(np.append(row_starts, height)), np.diff(np.append(col_starts, width)))
    total = values.sum(axis=(0, 1))
    ss_total = (values**2).sum() - (total**2).sum() / values[..., 0].size
    ss_between = (sums**2 / counts[..., None]).sum() - (total**2).sum() / values[..., 0].size
    return 1.0 if ss_total <= 1e-9 else float(np.clip(ss_between / ss_total, 0.0, 1.0))


def _edge_alignment(profiles: tuple[np.ndarray, np.ndarray], lines: tuple[np.ndarray, np.ndarray]) -> float:
    """Share of all edge energy within ALIGNMENT_RADIUS pitches of a detected line (0 if the
    image has no edges). Pixel art ~1; photos and noise ~ the share of positions near a line."""
    on_lines = everywhere = 0.0
    for profile, axis_lines in zip(profiles, lines):
        radius = max(1, round(ALIGNMENT_RADIUS * np.median(np.diff(axis_lines))))
        positions = np.arange(len(profile))
        near = np.abs(positions[:, None] - axis_lines[None, :]).min(axis=1) <= radius
        on_lines += profile[near].sum()
        everywhere += profile.sum()
    return float(on_lines / everywhere) if everywhere > 0 else 0.0


def _quality(rgb, profiles, lines, sprite: Image.Image) -> QualitySignals:
    grid_fit = _grid_fit(rgb, *lines)
    alignment = _edge_alignment(profiles, lines)
    palette_size = len(sprite.getcolors(maxcolors=sprite.width * sprite.height))
    return QualitySignals(
        grid_fit=grid_fit,
        palette_size=palette_size,
        is_pixel_art=_is_pixel_art(grid_fit, alignment, palette_size),
        edge_alignment=alignment,
    )


def quality_signals(image: Image.Image, grid: int = 24, sprite: Image.Image | None = None) -> QualitySignals:
    """How much `image` looks like a grid x grid pixel-art render. `sprite` (its snap) is
    computed when not given."""
    rgb = _rgb_array(image, grid)
    profiles = edge_profiles(rgb, grid)
    lines = _lines_from_profiles(profiles, grid)
    if sprite is None:
        sprite = _sprite(rgb, *lines, None)
    return _quality(rgb, profiles, lines, sprite.convert("RGB"))


def to_pixel_art(
    image: Image.Image,
    grid: int = 24,
    size: int = 1024,
    max_colors: int | None = None,
    integer_scale: bool = False,
) -> PixelArt:
    """The whole post-processing: find the grid once, snap, clean the palette, judge, upscale."""
    _check_max_colors(max_colors)
    rgb = _rgb_array(image, grid)
    profiles = edge_profiles(rgb, grid)
    lines = _lines_from_profiles(profiles, grid)
    sprite = _sprite(rgb, *lines, max_colors)
    return PixelArt(
        sprite=sprite,
        image=upscale(sprite, size, integer_scale),
        palette=palette_hex(sprite),
        quality=_quality(rgb, profiles, lines, sprite),
    )
