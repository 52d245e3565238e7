"""Turn a diffusion render (~512x512) into a true grid x grid pixel-art sprite and its upscale.

Stable Diffusion never draws a perfect lattice: cells breathe (19-23 px instead of 21.3), lines
bend, the grid is shifted and spans a little more or less than the canvas, flat areas drift in
colour and edges are soft and JPEG-like. We *know* the grid size, so instead of guessing it we fit
exactly `grid` cells per axis:

1. edge energy: per axis, how much colour changes between adjacent columns (rows), over the whole
   image and within strips one cell tall (wide);
2. straight grid lines: for each candidate pitch (span 496-528 px on 512), a dynamic programme
   places the grid + 1 lines on the strongest edges, each cell pitch +-20% wide, outer lines near
   where a centred grid puts them; the two axes' pitches are chosen together (cells are square
   overall). Lines follow breathing cells, and where a line has no edge at all (flat background)
   the width cost keeps it on the lattice;
3. bent lines: each strip's shift of the whole lattice (smooth from strip to strip) straightens the
   image for a second fit, then every line gets its own shift per strip, pulled by its neighbours
   where its own edges are weak. Only where the edges form a lattice at all (not noise or photos);
4. one colour per cell: per-channel median of samples from the cell's interior (edges are blurred),
   minus the smooth colour drift that steps between same-colour neighbours show;
5. palette cleaning: cell colours closer than the merge distance are merged, so a flat area is
   exactly one colour while two drawn colours 15 apart stay two.

Pure numpy + Pillow (no torch, no scipy), about 13 ms per 512 px image on one CPU core (bench/snap_quality.py).
The optional pixel-art controls on the snapped sprite (a fixed palette, the background) are
service/sprite_controls.py's (scipy, imported when a request uses them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from service.sprite_controls import KEEP, apply_controls

# --- grid lines (fractions of the image side, or of the nominal pitch = side / grid) ---------
SPAN_TOLERANCE = 0.04  # spec: the cells span 496-528 of 512 px (1 +- 0.031), plus slack
PITCH_CANDIDATES = 9  # pitches tried across that range (0.2 px apart on 512)
SQUARE_PULL = 0.1  # cost of a step between the two axes' candidate spans, per step squared (unary units)
OFFSET_TOLERANCE = 0.01  # spec: the grid is shifted by up to 4 of 512 px (0.008)
MAX_WIDTH_CHANGE = 0.2  # breathing: a cell is at most this much narrower/wider than the pitch
WIDTH_STIFFNESS = 0.5  # cost of a cell at the width limit, in units of a line's share of edges
BORDER_PULL = 0.05  # cost of an outer line at the edge of its window; only breaks ties
POOL_FRACTION = 1 / 3  # differences are summed over runs this long before abs(): noise cancels
MAX_BEND = 0.5  # the image's lines bend at most this far (pitches) from straight, strip by strip
LATTICE_WEIGHT = 4.0  # the common bend's unary: a strip's energy on the whole lattice, in units of one line
LINE_REACH = 0.2  # and each line at most this much further on its own
BEND_STIFFNESS = 0.05  # cost of a 1 px change of a line's shift from one strip to the next (unary units)
LATTICE_ALIGNMENT = 0.43  # bends are followed only where this share of the straightened edges is on lines
BEND_PULL = 0.5  # a line's shift also scores its neighbours' edges, at this weight: weak lines follow

# --- cell colours and palette -----------------------------------------------------------------
CELL_SAMPLES = 8  # samples per axis per cell (8x8 = 64 samples) for the median
INTERIOR_MARGIN = 0.2  # skip this share of the cell on each side: blurred edges live there
MERGE_DISTANCE = 12.0  # RGB distance below which two drift-corrected cell colours are "the same" colour
MERGE_PER_SPREAD = 1.0  # ... or this many times the typical pixel spread inside a cell, if larger
MERGE_PER_STEP = 4.0  # ... or this many times the typical step between neighbouring cells of one colour
SAME_COLOUR_STEP = 10.0  # neighbouring cells closer than this are one colour, for the drift fit
MIN_SAME_STEPS = 0.25  # share of neighbour steps that must be within one colour for a drift fit
DRIFT_DEGREE = 3  # the colour drift is a polynomial of this degree in the cell position, per channel
DRIFT_RIDGE = 1.0  # ridge on its coefficients: a drift the pairs do not pin down stays near zero

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
    sprite: Image.Image  # grid x grid RGB (RGBA with background "transparent")
    image: Image.Image  # nearest-neighbour upscale of `sprite`; indexed ("P") when it has <= 256 colours
    palette: list[str]  # '#rrggbb', most frequent first (opaque cells only)
    quality: QualitySignals
    background: np.ndarray | None = None  # grid x grid bool: the cells taken as background (None: "keep")


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


def _edge_strips(rgb: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Edge energy per axis within strips about one cell wide: (x strips, y strips), each (n, W + 1).

    For the x axis, position p is the edge between columns p-1 and p (0..W). Colour differences are summed
    over a strip's length (a cell) before abs(): pixel noise cancels, a real cell edge (a whole cell long)
    adds up, and bent lines can be followed strip by strip. Each strip's median is subtracted so
    flat-but-noisy areas and the (edgeless) area outside the image score alike."""

    height, width = rgb.shape[:2]

    def energy(sums: np.ndarray, axis: int) -> np.ndarray:  # colour change between neighbours along axis
        steps = np.diff(sums, axis=axis)
        np.abs(steps, out=steps)
        return steps[..., 0] + steps[..., 1] + steps[..., 2]  # 8x faster than .sum(axis=-1) over 3 channels

    def run_sums(a: np.ndarray, run: int, axis: int) -> np.ndarray:  # sums of whole runs along axis 0 or 1
        n = a.shape[axis] // run
        if axis == 0:
            return a[: n * run].reshape(n, run, *a.shape[1:]).sum(axis=1)
        # along rows: run strided slices added in place (numpy's sum over a middle axis is 5x slower; a BLAS
        # product would start threads on a busy server)
        pieces = a[:, : n * run].reshape(a.shape[0], n, run, *a.shape[2:])
        total = pieces[:, :, 0].copy()
        for offset in range(1, run):
            total += pieces[:, :, offset]
        return total

    def in_threes(runs: np.ndarray, axis: int) -> np.ndarray:  # strips of three runs (the last may be short)
        extra = -runs.shape[axis] % 3
        padded = np.concatenate([runs, np.zeros_like(runs.take(range(extra), axis=axis))], axis=axis)
        return run_sums(padded, 3, axis)

    x_run = max(1, int(height / grid * POOL_FRACTION))
    y_run = max(1, int(width / grid * POOL_FRACTION))
    x_runs, y_runs = run_sums(rgb, x_run, 0), run_sums(rgb, y_run, 1)  # (n, W, 3), (H, n, 3)

    def above_median(values: np.ndarray) -> np.ndarray:  # per row; padded with the positions 0 and W (no edge)
        return np.pad(
            np.maximum(values - np.median(values, axis=-1, keepdims=True), 0), [(0, 0)] * (values.ndim - 1) + [(1, 1)]
        )

    strips = above_median(energy(in_threes(x_runs, 0), 1)), above_median(energy(in_threes(y_runs, 1), 0).T)
    return strips[0], strips[1]


def _energy_at(profile: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Profile value at integer positions; 0 outside the image (a line there shows no edge)."""
    inside = (positions > 0) & (positions < len(profile) - 1)
    return np.where(inside, profile[np.clip(positions, 0, len(profile) - 1)], 0.0)


def _fit_lines(profile: np.ndarray, grid: int) -> np.ndarray:
    """grid + 1 line positions on the most edge energy, for the best of the candidate pitches."""
    scores, lines = _lattices(profile, grid)
    return lines[int(np.argmax(scores))]


def _square_lattices(profiles: tuple[np.ndarray, np.ndarray], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys) for the best pair of candidate pitches, both axes' scores summed minus SQUARE_PULL per squared
    step between their spans: the cells of a square sprite are square overall, so an axis whose edges are
    weak at one end (a flat background row) takes the span its stronger other axis shows instead of
    squeezing a cell in or out there."""
    (x_scores, x_lines), (y_scores, y_lines) = _lattices(profiles[0], grid), _lattices(profiles[1], grid)
    steps = np.arange(len(x_scores))
    total = x_scores[:, None] + y_scores[None, :] - SQUARE_PULL * (steps[:, None] - steps[None, :]) ** 2
    x_best, y_best = np.unravel_index(np.argmax(total), total.shape)
    return x_lines[x_best], y_lines[y_best]


def _lattices(profile: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate pitch, the best grid + 1 line positions on the edge energy (Viterbi) and their score:
    (pitches,) scores, -inf where none fits, and (pitches, grid + 1) positions.

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

    # only positions a line can take on some path from the first line's window to the last's: the same
    # optimum for a fraction of the work (a middle line has ~100 of the ~560 positions)
    first_lo, first_hi = (length - grid * pitches[-1]) / 2 - window, (length - grid * pitches[0]) / 2 + window
    last_lo, last_hi = (length + grid * pitches[0]) / 2 - window, (length + grid * pitches[-1]) / 2 + window
    lines = np.arange(grid + 1)
    lowest = np.maximum(first_lo + lines * widths[0], last_lo - (grid - lines) * widths[-1])
    highest = np.minimum(first_hi + lines * widths[-1], last_hi - (grid - lines) * widths[0])
    starts = np.clip(np.floor(lowest).astype(int) + margin, 0, len(positions))
    stops = np.clip(np.ceil(highest).astype(int) + margin + 1, starts, len(positions))

    unary = unary.astype(np.float32)
    width_cost = width_cost.astype(np.float32)
    # value[p, pad + i]: best total for pitch p with the current line at positions[i]; -inf pads the front
    pad = widths[-1]
    value = np.full((len(pitches), pad + len(positions)), -np.inf, dtype=np.float32)
    value[:, pad + starts[0] : pad + stops[0]] = (unary + border_prior(-1))[:, starts[0] : stops[0]]
    following = np.empty_like(value)
    windows = {  # reach views of both buffers, made once: [c, p, i] = buffer[p, i + c]
        id(buffer): np.lib.stride_tricks.sliding_window_view(buffer, len(widths), axis=1).transpose(2, 0, 1)
        for buffer in (value, following)
    }
    width_cost = np.ascontiguousarray(width_cost.T[:, :, None])  # (K, pitches, 1)
    back = []
    for line in range(1, grid + 1):
        start, stop = starts[line], max(stops[line], starts[line] + 1)  # tiny images: no position fits
        # reach[c, p, j]: total for pitch p with this line at positions[start + j], the previous widths[-1 - c] before
        reach = windows[id(value)][:, :, start:stop] - width_cost
        back.append((start, widths[-1] - reach.argmax(axis=0)))
        following.fill(-np.inf)
        following[:, pad + start : pad + stop] = reach.max(axis=0) + unary[start:stop]
        if line == 1:
            following[:, pad : pad + np.searchsorted(positions, 1)] = -np.inf
        if line == grid - 1:
            following[:, pad + np.searchsorted(positions, length, side="left") :] = -np.inf
        value, following = following, value
    value = value[:, pad:] + border_prior(+1)
    index = np.argmax(value, axis=1)
    scores = value[np.arange(len(pitches)), index]
    if not np.isfinite(scores).any():  # tiny images: whole-pixel widths can't fit the ranges
        regular = np.round(np.linspace(0, length, grid + 1)).astype(int)
        return np.zeros(len(pitches)), np.repeat(regular[None], len(pitches), axis=0)
    chosen = [index]
    for start, steps in reversed(back):
        at = np.minimum(np.maximum(chosen[-1] - start, 0), steps.shape[1] - 1)  # pitches with no path: any will do
        chosen.append(chosen[-1] - steps[np.arange(len(pitches)), at])
    return scores, positions[np.stack(chosen[::-1], axis=1)]


def _smoothest_shifts(unary: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """(strips, items) shifts, one Viterbi per item along the strips: the best total of unary[s, item, shift]
    minus BEND_STIFFNESS per px squared of change from one strip to the next."""
    step_cost = BEND_STIFFNESS * (shifts[:, None] - shifts[None, :]) ** 2  # (previous, next)
    items = np.arange(unary.shape[1])
    value, back = unary[0], []
    for strip in range(1, len(unary)):
        total = value[:, :, None] - step_cost  # (items, previous, next)
        back.append(total.argmax(axis=1))
        value = total.max(axis=1) + unary[strip]
    chosen = [value.argmax(axis=1)]
    for best in reversed(back):
        chosen.append(best[items, chosen[-1]])
    return shifts[np.array(chosen[::-1])]


def _line_energy(strips: np.ndarray, lines: np.ndarray, base: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """(strips, lines, shifts): strip s's edge energy at lines + base[s] + shift, 0 outside the image, in
    units of a line's average share of a strip."""
    n_strips, extent = strips.shape
    positions = lines[None, :, None] + base[:, None, None] + shifts[None, None, :]
    inside = (positions > 0) & (positions < extent - 1)
    rows = np.arange(n_strips)[:, None, None]
    energy = np.where(inside, strips[rows, np.clip(positions, 0, extent - 1)], 0.0)
    return energy / (strips.sum() / n_strips / len(lines) + 1e-9)


def _common_bend(strips: np.ndarray, lines: np.ndarray, reach: int) -> np.ndarray:
    """(strips,) shift of the whole lattice of `lines` that puts it on each strip's edges, changing
    smoothly from strip to strip: a strip with no edges (background) keeps the shift of its neighbours."""
    shifts = np.arange(-reach, reach + 1)
    energy = _line_energy(strips, lines, np.zeros(len(strips), dtype=int), shifts).sum(axis=1)
    return _smoothest_shifts(energy[:, None, :] / len(lines) * LATTICE_WEIGHT, shifts)[:, 0]


def _bend_lines(strips: np.ndarray, lines: np.ndarray, common: np.ndarray) -> np.ndarray:
    """Shift of every line in every strip (strips, grid + 1): the common bend plus each line's own.

    A line may move up to LINE_REACH pitches from where the common bend puts it, one Viterbi per line along
    the strips: the unary is the strip's edge energy at the shifted position plus BEND_PULL times the
    neighbouring lines' energy at the same shift (a line with no edge of its own in a strip follows its
    neighbours) and the shift changes smoothly from strip to strip, so a strip with no edges keeps the
    shift of the strips around it."""
    pitch = float(np.median(np.diff(lines)))
    reach = max(0, int(LINE_REACH * pitch))
    shifts = np.arange(-reach, reach + 1)
    energy = _line_energy(strips, lines, common, shifts)
    unary = energy.copy()
    unary[:, 1:] += BEND_PULL * energy[:, :-1]
    unary[:, :-1] += BEND_PULL * energy[:, 1:]
    return common[:, None] + _smoothest_shifts(unary, shifts)


def _straightened(strips: np.ndarray, bend: np.ndarray) -> np.ndarray:
    """The whole-image profile with each strip moved back by its bend: every line's edges line up again."""
    reach = int(np.abs(bend).max())
    padded = np.pad(strips, ((0, 0), (reach, reach)))
    columns = np.arange(strips.shape[1])[None, :] + reach + bend[:, None]
    return np.take_along_axis(padded, columns, axis=1).sum(axis=0)


def _lines_across(lines: np.ndarray, shifts: np.ndarray, strip_length: int, other_lines: np.ndarray) -> np.ndarray:
    """(cells of the other axis, grid + 1): the lines as they run through each cell row (column), the
    strip shifts interpolated to the centre of that row."""
    centres = np.arange(len(shifts)) * strip_length + strip_length / 2
    cell_centres = (other_lines[:-1] + other_lines[1:]) / 2
    where = np.interp(cell_centres, centres, np.arange(len(centres)))
    below = np.minimum(where.astype(int), len(centres) - 1)
    above = np.minimum(below + 1, len(centres) - 1)
    fraction = (where - below)[:, None]
    return lines[None, :] + shifts[below] * (1 - fraction) + shifts[above] * fraction


@dataclass(frozen=True)
class _Grid:
    lines: tuple[np.ndarray, np.ndarray]  # straight xs, ys, fitted to the straightened image
    bent: tuple[np.ndarray, np.ndarray]  # xs per cell row (rows, grid + 1), ys per cell column
    profiles: tuple[np.ndarray, np.ndarray]  # edge energy of the straightened image, per axis (the verdict's)


def find_grid_lines(rgb: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell boundaries as they run through each cell row and column: xs (rows, grid + 1) and ys (cols,
    grid + 1), float px. Outer ones may lie outside the image when the drawn grid runs off the canvas."""
    return _find_grid(rgb, grid).bent


def _find_grid(rgb: np.ndarray, grid: int) -> _Grid:
    """Straight lines fitted to the image straightened by the common bend, and the bent lines."""
    strips = _edge_strips(rgb, grid)
    reaches = [max(0, int(MAX_BEND * (strips[1 - axis].shape[1] - 1) / grid)) for axis in (0, 1)]
    first = [_fit_lines(strips[axis].sum(axis=0), grid) for axis in (0, 1)]
    straightened = [_straightened(strips[a], _common_bend(strips[a], first[a], reaches[a])) for a in (0, 1)]
    straight = list(_square_lattices((straightened[0], straightened[1]), grid))
    on_lines = [_share_on_lines(straightened[axis], straight[axis]) for axis in (0, 1)]
    if np.mean([near / max(total, 1e-9) for near, total in on_lines]) < LATTICE_ALIGNMENT:
        straight = first  # the edges are no lattice (noise, a photograph): no bend to follow
        straightened = [strips[axis].sum(axis=0) for axis in (0, 1)]
        shifts = [np.zeros((len(strips[axis]), grid + 1), dtype=int) for axis in (0, 1)]
    else:
        shifts = [_bend_lines(strips[a], straight[a], _common_bend(strips[a], straight[a], reaches[a])) for a in (0, 1)]
    strip_lengths = [3 * max(1, int((strips[1 - axis].shape[1] - 1) / grid * POOL_FRACTION)) for axis in (0, 1)]
    bent = [_lines_across(straight[a], shifts[a], strip_lengths[a], straight[1 - a]) for a in (0, 1)]
    return _Grid((straight[0], straight[1]), (bent[0], bent[1]), (straightened[0], straightened[1]))


# --- cells and palette ----------------------------------------------------------------------------


def _interior_samples(lines: np.ndarray, length: int) -> np.ndarray:
    """(..., grid, CELL_SAMPLES) pixel indices spread over each cell's visible interior; lines (..., grid + 1)."""
    lo, hi = np.clip(lines[..., :-1], 0, length - 1), np.clip(lines[..., 1:], 1, length)
    spread = INTERIOR_MARGIN + (1 - 2 * INTERIOR_MARGIN) * (np.arange(CELL_SAMPLES) + 0.5) / CELL_SAMPLES
    positions = np.floor(lo[..., None] + (hi - lo)[..., None] * spread).astype(int)
    return np.clip(positions, np.floor(lo[..., None]).astype(int), np.ceil(hi[..., None]).astype(int) - 1)


def cell_samples(rgb: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(rows, cols, S * S, 3) pixels from each cell's interior. xs: (rows, grid + 1), ys: (cols, grid + 1)."""
    px = _interior_samples(xs, rgb.shape[1])  # (rows, cols, S)
    py = _interior_samples(ys, rgb.shape[0]).transpose(1, 0, 2)  # (rows, cols, S)
    samples = rgb[py[:, :, :, None], px[:, :, None, :]]  # (rows, cols, S, S, 3)
    return samples.reshape(*samples.shape[:2], -1, 3)


def cell_colours(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cell, from its interior samples (rows, cols, n, 3): the per-channel median (rows, cols, 3),
    which ignores blurred edges, noise and stray pixels, and the spread of its pixels (rows, cols): the
    interquartile range / 1.349 (a Gaussian's sigma), averaged over channels. One sort gives both."""
    ordered = np.sort(samples, axis=2)
    n = ordered.shape[2]
    median = (ordered[:, :, (n - 1) // 2] + ordered[:, :, n // 2]) / 2
    spread = (ordered[:, :, (3 * n) // 4] - ordered[:, :, n // 4]).mean(axis=2) / 1.349
    return median, spread


def merge_distance(spread: np.ndarray, colors: np.ndarray) -> float:
    """How far apart two (drift-corrected) cell colours must be to stay two palette colours: MERGE_DISTANCE,
    or more where the render is less flat: MERGE_PER_SPREAD times the typical spread of the pixels inside a
    cell (noise, photographs: cell medians are noisy themselves), or MERGE_PER_STEP times the typical step
    between neighbouring cells of one colour (soft local shading that the smooth drift does not explain).
    Crisp renders keep MERGE_DISTANCE, so two drawn colours 15 apart stay two."""
    steps = np.sqrt(np.square(_neighbour_steps(colors)).sum(axis=1))
    same = steps[steps < SAME_COLOUR_STEP]
    step = float(np.median(same)) if len(same) else 0.0
    return max(MERGE_DISTANCE, MERGE_PER_SPREAD * float(np.median(spread)), MERGE_PER_STEP * step)


def _neighbour_steps(a: np.ndarray) -> np.ndarray:
    """(pairs, channels): differences to every right, lower and diagonal neighbour of a (rows, cols, channels)."""
    pairs = [(a[:, 1:], a[:, :-1]), (a[1:], a[:-1]), (a[1:, 1:], a[:-1, :-1]), (a[1:, :-1], a[:-1, 1:])]
    return np.concatenate([(p - q).reshape(-1, a.shape[-1]) for p, q in pairs])


def colour_drift(colors: np.ndarray) -> np.ndarray:
    """(rows, cols, 3) slow colour drift across the image, zero on average, to subtract from cell colours.

    Diffusion renders shade a flat area slightly (here +-10 per channel), which makes one drawn colour
    spread wider than two close drawn colours are apart. The drift is smooth, so it shows in the small
    steps between neighbouring cells of one colour (diagonal ones too: a checkered background has only
    those): a DRIFT_DEGREE polynomial in the cell position is fitted
    (least squares, per channel) to every step between neighbours closer than SAME_COLOUR_STEP, where edges
    between colours drop out."""
    rows, cols = colors.shape[:2]
    v, u = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij")
    powers = [(i, j) for i in range(DRIFT_DEGREE + 1) for j in range(DRIFT_DEGREE + 1 - i) if i + j]
    terms = np.stack([u**i * v**j for i, j in powers], axis=-1)  # (rows, cols, K)

    colour_steps, term_steps = _neighbour_steps(colors), _neighbour_steps(terms)
    same = np.sqrt(np.square(colour_steps).sum(axis=1)) < SAME_COLOUR_STEP
    if same.mean() < MIN_SAME_STEPS:  # not flat areas (noise, a photograph): no drift to measure
        return np.zeros_like(colors)
    a, b = term_steps[same], colour_steps[same]
    coefficients = np.linalg.solve(a.T @ a + DRIFT_RIDGE * np.eye(len(powers)), a.T @ b)
    drift = terms @ coefficients
    return drift - drift.mean(axis=(0, 1))


def clean_palette(
    colors: np.ndarray, max_colors: int | None = None, merge_distance: float = MERGE_DISTANCE
) -> np.ndarray:
    """Map every colour of an (N, 3) array onto a clean palette; returns (N, 3) uint8.

    Seeds: the densest colour takes everything within MERGE_DISTANCE/2 of it, repeatedly.
    Then the closest pair of clusters (count-weighted centroids) is merged while closer than
    MERGE_DISTANCE, or while more than `max_colors` remain -- so one flat area becomes exactly
    one colour, and `max_colors` is met by giving up the least distinct colours first."""
    # per-channel broadcasting, not a BLAS matmul: no thread start-up cost on a busy server
    points = colors.astype(np.float32).T
    squared_distances = sum(np.square(channel[:, None] - channel[None, :]) for channel in points)
    near = squared_distances < (merge_distance / 2) ** 2
    density = near.sum(axis=1)
    labels = np.full(len(colors), -1)
    n_seeds = 0
    while (unassigned := labels < 0).any():
        seed = np.flatnonzero(unassigned)[np.argmax(density[unassigned])]
        labels[unassigned & near[seed]] = n_seeds
        n_seeds += 1
    counts = np.bincount(labels).astype(np.float64)
    sums = np.stack([np.bincount(labels, weights=colors[:, c]) for c in range(3)], axis=1)
    merged_into = _merge_closest(sums, counts, max_colors if max_colors is not None else n_seeds, merge_distance)
    palette = np.clip(np.rint(sums / counts[:, None]), 0, 255).astype(np.uint8)
    return palette[merged_into[labels]]


def _merge_closest(
    sums: np.ndarray, counts: np.ndarray, limit: int, merge_distance: float = MERGE_DISTANCE
) -> np.ndarray:
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
        if closest[keep] >= merge_distance and alive <= limit:
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
    colors, spread = cell_colours(cell_samples(rgb, xs, ys))
    colors = colors - colour_drift(colors)
    cleaned = clean_palette(colors.reshape(-1, 3), max_colors, merge_distance(spread, colors)).reshape(colors.shape)
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
    indexed "P" image with exactly those colours: its PNG encodes about 4x faster and half as big. An RGBA
    sprite keeps its alpha (in the indexed image's palette: the PNG's tRNS chunk).
    """
    cols, rows = sprite.size
    if size < max(cols, rows):
        raise ValueError(f"size {size} is smaller than the {cols}x{rows} sprite")
    mode = "RGBA" if sprite.mode == "RGBA" else "RGB"
    pixels = np.asarray(sprite.convert(mode))

    def cell_sizes(cells: int) -> np.ndarray:
        if integer_scale:
            return np.full(cells, size // cells)
        return np.diff(np.floor(np.arange(cells + 1) * size / cells + 0.5).astype(int))

    def blocks(cells: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(cells, cell_sizes(rows), axis=0), cell_sizes(cols), axis=1)

    colors, indices = np.unique(pixels.reshape(-1, len(mode)), axis=0, return_inverse=True)
    if len(colors) > 256:
        return Image.fromarray(blocks(pixels), mode)
    indexed = blocks(indices.reshape(rows, cols).astype(np.uint8))
    image = Image.frombytes("P", (indexed.shape[1], indexed.shape[0]), indexed.tobytes())
    image.putpalette(colors.astype(np.uint8).tobytes(), mode)
    return image


def palette_hex(sprite: Image.Image) -> list[str]:
    """The sprite's colours as '#rrggbb', most frequent first (ties: by colour, for stability); of an RGBA
    sprite, those of its opaque cells."""
    pixels = np.asarray(sprite.convert("RGBA"))
    opaque = pixels[..., :3][pixels[..., 3] > 0]
    colors, counts = np.unique(opaque.reshape(-1, 3), axis=0, return_counts=True)
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
        near, total = _share_on_lines(profile, axis_lines)
        on_lines += near
        everywhere += total
    return float(on_lines / everywhere) if everywhere > 0 else 0.0


def _share_on_lines(profile: np.ndarray, lines: np.ndarray) -> tuple[float, float]:
    """(edge energy within ALIGNMENT_RADIUS pitches of a line, all edge energy) on one axis."""
    radius = max(1, round(ALIGNMENT_RADIUS * np.median(np.diff(lines))))
    positions = np.arange(len(profile))
    near = np.abs(positions[:, None] - lines[None, :]).min(axis=1) <= radius
    return float(profile[near].sum()), float(profile.sum())


def _quality(rgb: np.ndarray, found: _Grid, sprite: Image.Image) -> QualitySignals:
    """The signals on the straight lines; edge alignment on the straightened image, so that a bent but clean
    lattice still counts as pixel art."""
    grid_fit = _grid_fit(rgb, *found.lines)
    alignment = _edge_alignment(found.profiles, found.lines)
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
    found = _find_grid(rgb, grid)
    if sprite is None:
        sprite = _sprite(rgb, *found.bent, None)
    return _quality(rgb, found, sprite.convert("RGB"))


def to_pixel_art(
    image: Image.Image,
    grid: int = 24,
    size: int = 1024,
    max_colors: int | None = None,
    integer_scale: bool = False,
    palette: tuple[str, ...] | None = None,
    background: str = KEEP,
) -> PixelArt:
    """The whole post-processing: find the grid once, snap, clean the palette (max_colors), apply the controls
    (a fixed palette, the background: service/sprite_controls.py), upscale. The quality signals judge the snap
    itself, before the controls (`palette` lists the delivered colours)."""
    _check_max_colors(max_colors)
    rgb = _rgb_array(image, grid)
    found = _find_grid(rgb, grid)
    sprite = _sprite(rgb, *found.bent, max_colors)
    quality = _quality(rgb, found, sprite)
    mask = None
    if palette is not None or background != KEEP:
        controlled, mask = apply_controls(np.asarray(sprite), palette, background)
        sprite = Image.fromarray(controlled, "RGBA" if controlled.shape[-1] == 4 else "RGB")
    return PixelArt(
        sprite=sprite,
        image=upscale(sprite, size, integer_scale),
        palette=palette_hex(sprite),
        quality=quality,
        background=mask,
    )
