"""Turn a diffusion render (~512x512) into a true grid x grid pixel-art sprite and its upscale.

Stable Diffusion never draws a perfect lattice: cells breathe (19-23 px instead of 21.3), lines
bend, the grid is shifted and spans a little more or less than the canvas, flat areas drift in
colour and edges are soft and JPEG-like. We *know* the grid size, so instead of guessing it we fit
exactly `grid` cells per axis:

1. edge profile: per axis, how much colour changes between adjacent columns (rows);
2. grid lines: for each candidate pitch (span 496-528 px on 512), a dynamic programme places
   the grid + 1 lines on the strongest edges, each cell pitch +-20% wide, outer lines near where
   a centred grid puts them; the best-scoring pitch wins. Lines follow breathing cells, and
   where a line has no edge at all (flat background) the width cost keeps it on the lattice;
3. one colour per cell: per-channel median of samples from the cell's interior (edges are blurred);
4. palette cleaning: near-identical cell colours are merged so a flat area is exactly one colour.

Pure numpy + Pillow (no torch, no scipy) and a few milliseconds per image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

# --- grid lines (fractions of the image side, or of the nominal pitch = side / grid) ---------
SPAN_TOLERANCE = 0.04  # spec: the cells span 496-528 of 512 px (1 +- 0.031), plus slack
PITCH_CANDIDATES = 9  # pitches tried across that range (0.2 px apart on 512)
OFFSET_TOLERANCE = 0.01  # spec: the grid is shifted by up to 4 of 512 px (0.008)
MAX_WIDTH_CHANGE = 0.2  # breathing: a cell is at most this much narrower/wider than the pitch
WIDTH_STIFFNESS = 0.5  # cost of a cell at the width limit, in units of a line's share of edges
BORDER_PULL = 0.05  # cost of an outer line at the edge of its window; only breaks ties
POOL_FRACTION = 1 / 3  # differences are summed over runs this long before abs(): noise cancels

# --- cell colours and palette -----------------------------------------------------------------
CELL_SAMPLES = 8  # samples per axis per cell (8x8 = 64 samples) for the median
INTERIOR_MARGIN = 0.2  # skip this share of the cell on each side: blurred edges live there
MERGE_DISTANCE = 24.0  # RGB distance below which two cell colours are "the same" colour

# --- verdict ------------------------------------------------------------------------------------
MIN_GRID_FIT = 0.85  # share of variance the cell-constant image must explain
MIN_EDGE_ALIGNMENT = 0.55  # share of edge energy that must sit on the detected grid lines
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
    image: Image.Image  # nearest-neighbour upscale of `sprite`; indexed ("P") when it has <= 256 colours
    palette: list[str]  # '#rrggbb', most frequent first
    quality: QualitySignals


def _is_pixel_art(grid_fit: float, edge_alignment: float, palette_size: int) -> bool:
    """One place for the verdict. grid_fit alone is not enough: a smooth photo is also mostly
    explained by 24x24 cell means. Pixel art additionally has its edges *on* the grid lines
    (a photo's edges are everywhere) and a small palette."""
    return grid_fit >= MIN_GRID_FIT and edge_alignment >= MIN_EDGE_ALIGNMENT and palette_size <= MAX_PALETTE_SIZE


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


def _fit_lines(profile: np.ndarray, grid: int) -> np.ndarray:
    """grid + 1 line positions that sit on the most edge energy (Viterbi), for the best pitch.

    Every candidate pitch (the grid's span within SPAN_TOLERANCE of the image side) gets its own
    dynamic programme, all run at once: its outer lines must lie within OFFSET_TOLERANCE of where
    a centred grid of that pitch would put them, each cell is pitch +-MAX_WIDTH_CHANGE wide
    (breathing) with a quadratic cost on the deviation, and every cell keeps at least one pixel
    inside the image. The width cost is what lets flat, edgeless stretches (background) fall back
    to the regular lattice between the edges that anchor them, and it favours the pitch that
    explains the whole image over one that squeezes an extra cell into a flat area."""
    length = len(profile) - 1
    nominal = length / grid
    pitches = nominal * np.linspace(1 - SPAN_TOLERANCE, 1 + SPAN_TOLERANCE, PITCH_CANDIDATES)
    window = length * OFFSET_TOLERANCE + 1  # +1: rounding, and the pitch grid's spacing
    margin = int(np.ceil(grid * pitches[-1] / 2 - length / 2 + window))
    positions = np.arange(-margin, length + margin + 1)
    energy = _energy_at(profile, positions)
    unary = energy / (energy.sum() / (grid + 1) + 1e-9)  # units: "all energy shared by the lines"
    narrowest = max(1, int(np.ceil(pitches[0] * (1 - MAX_WIDTH_CHANGE))))
    widths = np.arange(narrowest, int(pitches[-1] * (1 + MAX_WIDTH_CHANGE)) + 1)
    stretch = (widths[None, ::-1] - pitches[:, None]) / (MAX_WIDTH_CHANGE * pitches[:, None])
    width_cost = np.where(np.abs(stretch) <= 1, WIDTH_STIFFNESS * stretch**2, np.inf)  # (pitches, K)

    def border_prior(sign: int) -> np.ndarray:  # (pitches, positions): outer line near a centred grid's
        offset = (positions[None, :] - (length + sign * grid * pitches[:, None]) / 2) / window
        return np.where(np.abs(offset) <= 1, -BORDER_PULL * offset**2, -np.inf)

    value, back = unary + border_prior(-1), []
    for line in range(1, grid + 1):
        # reach[p, j, c]: best total for pitch p with the previous line at positions[j] - widths[-1 - c]
        padded = np.concatenate([np.full((len(pitches), widths[-1]), -np.inf), value], axis=1)
        reach = np.lib.stride_tricks.sliding_window_view(padded, len(widths), axis=1)[:, : len(positions)]
        reach = reach - width_cost[:, None, :]
        best = np.argmax(reach, axis=2)
        back.append(widths[-1] - best)
        value = np.take_along_axis(reach, best[..., None], axis=2)[..., 0] + unary
        if line == 1:
            value[:, positions < 1] = -np.inf
        if line == grid - 1:
            value[:, positions > length - 1] = -np.inf
    value = value + border_prior(+1)
    pitch, index = np.unravel_index(np.argmax(value), value.shape)
    if not np.isfinite(value[pitch, index]):  # tiny images: whole-pixel widths can't fit the ranges
        return np.round(np.linspace(0, length, grid + 1)).astype(int)
    chosen = [int(index)]
    for step in reversed(back):
        chosen.append(chosen[-1] - int(step[pitch, chosen[-1]]))
    return positions[chosen[::-1]]


def find_grid_lines(rgb: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """grid + 1 cell boundaries per axis (xs, ys). Outer ones may lie outside the image when the
    drawn grid runs off the canvas; every cell keeps at least one pixel inside."""
    return _lines_from_profiles(edge_profiles(rgb, grid), grid)


def _lines_from_profiles(profiles: tuple[np.ndarray, np.ndarray], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys) from already computed profiles, which the quality signals reuse."""
    return _fit_lines(profiles[0], grid), _fit_lines(profiles[1], grid)


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

    Seeds: the densest colour takes everything within MERGE_DISTANCE/2 of it, repeatedly.
    Then the closest pair of clusters (count-weighted centroids) is merged while closer than
    MERGE_DISTANCE, or while more than `max_colors` remain -- so one flat area becomes exactly
    one colour, and `max_colors` is met by giving up the least distinct colours first."""
    # per-channel broadcasting, not a BLAS matmul: no thread start-up cost on a busy server
    points = colors.astype(np.float32).T
    squared_distances = sum(np.square(channel[:, None] - channel[None, :]) for channel in points)
    near = squared_distances < (MERGE_DISTANCE / 2) ** 2
    density = near.sum(axis=1)
    labels = np.full(len(colors), -1)
    n_seeds = 0
    while (unassigned := labels < 0).any():
        seed = np.flatnonzero(unassigned)[np.argmax(density[unassigned])]
        labels[unassigned & near[seed]] = n_seeds
        n_seeds += 1
    counts = np.bincount(labels).astype(np.float64)
    sums = np.stack([np.bincount(labels, weights=colors[:, c]) for c in range(3)], axis=1)
    merged_into = _merge_closest(sums, counts, max_colors if max_colors is not None else n_seeds)
    palette = np.clip(np.rint(sums / counts[:, None]), 0, 255).astype(np.uint8)
    return palette[merged_into[labels]]


def _merge_closest(sums: np.ndarray, counts: np.ndarray, limit: int) -> np.ndarray:
    """Merge the closest pair of clusters (in place on sums/counts) while closer than MERGE_DISTANCE or
    more than `limit` remain; returns, per cluster, the cluster it ended up in.

    The pairwise distances are kept and only the merged cluster's row is recomputed, with each row's
    nearest neighbour cached, so a noisy render with hundreds of seed colours costs milliseconds, not
    a second. Ties go to the lowest (row, column), as an argmin over the whole matrix would."""
    n = len(counts)
    rows = np.arange(n)
    if n < 2:
        return rows
    centres = sums / counts[:, None]
    # Euclidean, summed then rooted like np.linalg.norm, so near-ties break exactly as a full recompute would
    gaps = np.sqrt(sum(np.square(centres[:, c, None] - centres[None, :, c]) for c in range(3)))
    np.fill_diagonal(gaps, np.inf)
    nearest = gaps.argmin(axis=1)
    merged_into = rows.copy()
    alive = n
    while alive > 1:
        closest = gaps[rows, nearest]
        keep = int(np.argmin(closest))  # the lower index of the pair: its row is the first holding the minimum
        drop = int(nearest[keep])
        if closest[keep] >= MERGE_DISTANCE and alive <= limit:
            break
        sums[keep] += sums[drop]
        counts[keep] += counts[drop]
        merged_into[merged_into == drop] = keep
        alive -= 1
        gaps[drop, :] = gaps[:, drop] = np.inf
        centres[keep] = sums[keep] / counts[keep]
        changed = np.sqrt(np.square(centres - centres[keep]).sum(axis=1))
        changed[merged_into != rows] = np.inf  # merged-away clusters
        changed[keep] = np.inf
        gaps[keep, :] = gaps[:, keep] = changed
        stale = (nearest == drop) | (nearest == keep) | (rows == keep)  # their minimum may have moved away
        current = gaps[rows, nearest]
        nearest[(changed < current) | ((changed == current) & (keep < nearest))] = keep
        nearest[stale] = gaps[stale].argmin(axis=1)
    return merged_into


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

    A sprite of at most 256 colours (a cleaned palette always is, short of noise) comes back as an
    indexed "P" image with exactly those colours: its PNG encodes about 4x faster and half as big.
    """
    cols, rows = sprite.size
    if size < max(cols, rows):
        raise ValueError(f"size {size} is smaller than the {cols}x{rows} sprite")
    pixels = np.asarray(sprite.convert("RGB"))

    def cell_sizes(cells: int) -> np.ndarray:
        if integer_scale:
            return np.full(cells, size // cells)
        return np.diff(np.floor(np.arange(cells + 1) * size / cells + 0.5).astype(int))

    def blocks(cells: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(cells, cell_sizes(rows), axis=0), cell_sizes(cols), axis=1)

    colors, indices = np.unique(pixels.reshape(-1, 3), axis=0, return_inverse=True)
    if len(colors) > 256:
        return Image.fromarray(blocks(pixels), "RGB")
    indexed = blocks(indices.reshape(rows, cols).astype(np.uint8))
    image = Image.frombytes("P", (indexed.shape[1], indexed.shape[0]), indexed.tobytes())
    image.putpalette(colors.astype(np.uint8).tobytes())
    return image


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
    # cell sums of 8-bit pixel values are exact in float32; the rest is done in float64
    sums = np.add.reduceat(np.add.reduceat(rgb, row_starts, axis=0), col_starts, axis=1).astype(np.float64)
    counts = np.outer(np.diff(np.append(row_starts, height)), np.diff(np.append(col_starts, width)))
    total = sums.sum(axis=(0, 1))
    centred = (rgb - (total / (height * width)).astype(np.float32)).ravel()
    ss_total = float(np.dot(centred, centred))
    ss_between = float((sums**2 / counts[..., None]).sum() - (total**2).sum() / (height * width))
    return 1.0 if ss_total <= 1e-6 * rgb.size else float(np.clip(ss_between / ss_total, 0.0, 1.0))


def _edge_alignment(profiles: tuple[np.ndarray, np.ndarray], lines: tuple[np.ndarray, np.ndarray]) -> float:
    """Share of all edge energy within ALIGNMENT_RADIUS pitches of a detected line (0 if the
    image has no edges). Pixel art ~1; photos and noise ~ the share of positions near a line."""
    on_lines = everywhere = 0.0
    for profile, axis_lines in zip(profiles, lines, strict=True):
        radius = max(1, round(ALIGNMENT_RADIUS * np.median(np.diff(axis_lines))))
        positions = np.arange(len(profile))
        near = np.abs(positions[:, None] - axis_lines[None, :]).min(axis=1) <= radius
        on_lines += profile[near].sum()
        everywhere += profile.sum()
    return float(on_lines / everywhere) if everywhere > 0 else 0.0


def _quality(
    rgb: np.ndarray,
    profiles: tuple[np.ndarray, np.ndarray],
    lines: tuple[np.ndarray, np.ndarray],
    sprite: Image.Image,
) -> QualitySignals:
    grid_fit = _grid_fit(rgb, *lines)
    alignment = _edge_alignment(profiles, lines)
    colours = sprite.getcolors(maxcolors=sprite.width * sprite.height)
    assert colours is not None  # None only when there are more than maxcolors colours: not more than the pixels
    palette_size = len(colours)
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
