"""Pixel-art controls that only a server knowing the exact grid and palette of its images can offer: a fixed
palette (`palette`) and the background made transparent or recoloured (`background`).

Both work on the snapped grid x grid sprite (service/pixelart.py applies them after `max_colors`), so they cost
microseconds to a few milliseconds per image (bench/controls.py):

- palette: every cell takes a palette colour, nearest in OKLab (a perceptual space: equal distances look about
  equally different), chosen as one assignment rather than independent nearest lookups. While the palette has at
  least as many colours as the sprite, two distinct sprite colours get two distinct palette colours (an eye does
  not merge into the skin beside it); with fewer, the closest sprite colours are merged first (Ward's linkage).
  Each sprite colour's error counts once per cell it covers, so a large area keeps its nearest colour.
- background: the border-connected region of the sprite's background colour, flat or checkered in cells of one
  or two (the training portraits' checks are 2x2); a cell of another colour (the outline, hair or a hat touching
  the border) stops it, so nothing inside the portrait is taken.

The parsing half (preset names, '#rrggbb' codes) is torch- and scipy-free: service/requests.py checks requests
with it before anything heavy is imported.
"""

import re

import numpy as np

from service import config
from service.errors import RequestError

HEX_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
KEEP, TRANSPARENT = "keep", "transparent"
# Palettes that are plain facts about hardware, nobody's artwork.
PRESETS: dict[str, tuple[str, ...]] = {
    # PICO-8's fixed 16-colour display palette
    "pico-8": (
        *("#000000", "#1d2b53", "#7e2553", "#008751", "#ab5236", "#5f574f", "#c2c3c7", "#fff1e8"),
        *("#ff004d", "#ffa300", "#ffec27", "#00e436", "#29adff", "#83769c", "#ff77a8", "#ffccaa"),
    ),
    # the original Game Boy's (DMG) four shades of green, darkest first
    "game-boy": ("#0f380f", "#306230", "#8bac0f", "#9bbc0f"),
}
CHECKER_CELLS = (1, 2)  # checks of one cell, or of 2x2 cells as the training portraits have
MIN_CHECKER_SHARE = 0.25  # the second border colour covers at least this share of the border for a checker
MIN_CHECKER_FIT = 0.9  # ... and the border's two colours follow the checker pattern in at least this share
LINEAR_SRGB_TO_LMS = np.array(
    [
        [0.4122214708, 0.5363325363, 0.0514459929],
        [0.2119034982, 0.6806995451, 0.1073969566],
        [0.0883024619, 0.2817188376, 0.6299787005],
    ]
)
LMS_TO_OKLAB = np.array(
    [
        [0.2104542553, 0.7936177850, -0.0040720468],
        [1.9779984951, -2.4285922050, 0.4505937099],
        [0.0259040371, 0.7827717662, -0.8086757660],
    ]
)


# --- parsing: what a request may say ------------------------------------------------------------


def palette_colours(value: object) -> tuple[str, ...]:
    """The '#rrggbb' colours (lower case) of a request's `palette`: a preset's name or a list of codes.
    RequestError naming `palette` otherwise; the message never repeats the value."""
    if isinstance(value, str):
        if value.strip().lower() in PRESETS:
            return PRESETS[value.strip().lower()]
        raise RequestError("palette", f"unknown preset; give one of {', '.join(PRESETS)} or a list of '#rrggbb'")
    if not isinstance(value, list | tuple) or not value:
        raise RequestError("palette", "must be a preset name or a non-empty list of '#rrggbb' colours")
    if len(value) > config.MAX_PALETTE_COLORS:
        raise RequestError("palette", f"at most {config.MAX_PALETTE_COLORS} colours, got {len(value)}")
    for index, code in enumerate(value):
        if not isinstance(code, str) or not HEX_COLOUR.fullmatch(code):
            raise RequestError("palette", f"colour {index + 1} is not a '#rrggbb' code")
    return tuple(dict.fromkeys(code.lower() for code in value))  # duplicates once, in order


def palette_from_text(text: str) -> str | tuple[str, ...]:
    """A palette as one line of text says it (the CLI's --palette, Cog's `palette`): a preset's name, or '#rrggbb'
    codes separated by commas or spaces. Checked later, by palette_colours."""
    return tuple(re.split(r"[\s,]+", text.strip())) if "#" in text else text


def check_background(value: object) -> str:
    """'keep', 'transparent' or a '#rrggbb' code (lower case); RequestError naming `background` otherwise."""
    if value in (KEEP, TRANSPARENT):
        return str(value)
    if isinstance(value, str) and HEX_COLOUR.fullmatch(value):
        return value.lower()
    raise RequestError("background", "must be 'keep', 'transparent' or a '#rrggbb' colour")


def rgb_codes(codes: tuple[str, ...]) -> np.ndarray:
    """(n, 3) uint8 from '#rrggbb' codes."""
    return np.array([[int(code[i : i + 2], 16) for i in (1, 3, 5)] for code in codes], dtype=np.uint8).reshape(-1, 3)


# --- the controls on a sprite ----------------------------------------------------------------------


def oklab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB 0..255 -> OKLab (L 0..1), with Björn Ottosson's published matrices."""
    c = np.asarray(rgb, dtype=np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return np.cbrt(linear @ LINEAR_SRGB_TO_LMS.T) @ LMS_TO_OKLAB.T


def map_to_palette(colours: np.ndarray, counts: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """The palette colour (n, 3) uint8 for each of n distinct sprite colours (n, 3) covering counts (n,) cells.

    One assignment (scipy's linear_sum_assignment) minimising the summed OKLab distance over all cells: distinct
    sprite colours get distinct palette colours while the palette has room; beyond that, the closest sprite
    colours are merged first (scipy's Ward linkage) and each merged group gets one palette colour."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.optimize import linear_sum_assignment

    lab, targets = oklab(colours), oklab(palette)
    if len(colours) > len(palette):
        groups = fcluster(linkage(lab, method="ward"), t=len(palette), criterion="maxclust") - 1
    else:
        groups = np.arange(len(colours))
    weights = np.bincount(groups, weights=counts)
    centres = np.stack([np.bincount(groups, weights=counts * lab[:, c]) for c in range(3)], axis=1) / weights[:, None]
    distances = np.sqrt(np.square(centres[:, None, :] - targets[None, :, :]).sum(axis=-1))
    rows, chosen = linear_sum_assignment(weights[:, None] * distances)
    colour_of_group = np.empty(len(weights), dtype=int)
    colour_of_group[rows] = chosen
    return palette[colour_of_group[groups]]


def background_mask(sprite: np.ndarray) -> np.ndarray:
    """(rows, cols) bool: the cells of the sprite's (rows, cols, 3) background, i.e. the cells of the border's
    commonest colour (or of its checker with the border's second colour) connected to the border through such
    cells. 8-connected: the background between two spikes of hair, which touches the rest only at a corner, is
    background too (the outline keeps the portrait's inside apart, and the inside is rarely the background's
    colour)."""
    from scipy.ndimage import label

    codes = sprite[..., 0].astype(np.int32) << 16 | sprite[..., 1].astype(np.int32) << 8 | sprite[..., 2]
    on_border = np.zeros(codes.shape, dtype=bool)
    on_border[[0, -1], :] = on_border[:, [0, -1]] = True
    values, counts = np.unique(codes[on_border], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    expected = np.full(codes.shape, values[order[0]])  # flat
    if len(values) > 1 and counts[order[1]] >= MIN_CHECKER_SHARE * on_border.sum():
        checker = _best_checker(codes, on_border, values[order[0]], values[order[1]])
        if checker is not None:
            expected = checker
    regions, _ = label(codes == expected, structure=np.ones((3, 3)))
    touching = np.unique(regions[on_border & (regions > 0)])
    return np.isin(regions, touching)


def _best_checker(codes: np.ndarray, on_border: np.ndarray, first: int, second: int) -> np.ndarray | None:
    """The checker of `first` and `second` (cells of CHECKER_CELLS, any phase) that the border follows best, if
    it follows one in MIN_CHECKER_FIT of its cells of those two colours; None: the border is not checkered."""
    rows, cols = np.indices(codes.shape)
    two_colours = on_border & np.isin(codes, [first, second])
    best, best_fit = None, MIN_CHECKER_FIT * two_colours.sum()
    for size in CHECKER_CELLS:
        for row_shift in range(size):
            for col_shift in range(size):
                odd = ((rows + row_shift) // size + (cols + col_shift) // size) % 2 == 1
                for pattern in (np.where(odd, second, first), np.where(odd, first, second)):
                    fit = (codes == pattern)[two_colours].sum()
                    if fit >= best_fit:
                        best, best_fit = pattern, fit
    return best


def apply_controls(
    sprite: np.ndarray, palette: tuple[str, ...] | None, background: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """The sprite (rows, cols, 3) uint8 with the controls applied: (rows, cols, 3), or (rows, cols, 4) RGBA with
    background 'transparent' (alpha 0, colour 0 there); and the background mask (None with 'keep'). The mask is
    found before the palette (which may give the background and the hair one colour); the palette then maps the
    other cells, or all of them with 'keep'. A '#rrggbb' background is used as given, palette or not."""
    mask = background_mask(sprite) if background != KEEP else None
    result = sprite.copy()
    if palette is not None:
        mapped = ~mask if mask is not None else np.ones(sprite.shape[:2], dtype=bool)
        if mapped.any():
            colours, inverse, counts = np.unique(sprite[mapped], axis=0, return_inverse=True, return_counts=True)
            result[mapped] = map_to_palette(colours, counts, rgb_codes(palette))[inverse.ravel()]
    if mask is None:
        return result, None
    if background == TRANSPARENT:
        alpha = np.where(mask, 0, 255).astype(np.uint8)
        result[mask] = 0
        return np.dstack([result, alpha]), mask
    result[mask] = rgb_codes((background,))[0]
    return result, mask
