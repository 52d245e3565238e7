"""Procedural, licence-clean 24x24 punk portraits with attributes and captions in the trained caption format.

Every portrait is drawn from scratch by the rules below (no third-party collection is copied): a head on a
flat or checkered background, with skin tone, eyes, mouth, hair style and colour, headwear, glasses, earring,
cigarette and shirt. Each has a caption in the format the real LoRA was trained on
("pixel art, 24x24, portrait of bespoke punk lad, hair (#c06148), wearing ..., <colour> background (#...),
palette: ..., sharp pixel edges, hard color borders, retro pixel art style"), or, for some, the short
description a user types put into the service's prompt template, so both kinds of prompt work.

The layout is fixed (head columns 7-16, rows 5-19; eyes on row 11; shirt rows 20-23 within columns 4-19) so
that tests can find an attribute in a snapped sprite: the background fills the top row and the side columns,
a cap's brim sticks out right of the head on row 8, sunglasses are dark across row 11.
"""

from dataclasses import dataclass

import numpy as np

from service.prompts import PROMPT_PREFIX, PROMPT_SUFFIX

GRID = 24
Colour = tuple[int, int, int]


def rgb(code: str) -> Colour:
    return int(code[1:3], 16), int(code[3:5], 16), int(code[5:7], 16)


def hex_code(colour: Colour) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


OUTLINE = rgb("#000000")
BACKGROUNDS = {  # name -> (colour, second colour of its checkered version)
    "red": ("#c8323c", "#a0232d"),
    "blue": ("#3c64c8", "#2d4ba0"),
    "green": ("#4e9a3a", "#3a7a2a"),
    "yellow": ("#f0cd46", "#d2aa32"),
    "purple": ("#8246b4", "#643296"),
    "pink": ("#f5a0be", "#dc82a0"),
    "orange": ("#f08c28", "#d26e14"),
    "teal": ("#2a9d8f", "#1e7d6e"),
    "grey": ("#8c8c8c", "#6e6e6e"),
    "brick": ("#c06148", "#9a4632"),
}
SKINS = {  # caption words -> colour
    "light male skin tone": "#f0c8a0",
    "medium male skin tone": "#b27f60",
    "tan male skin tone": "#c8965a",
    "dark male skin tone": "#6b4226",
    "pale male skin tone": "#ffe6d2",
}
EYES = {"dark brown eyes": "#3b2416", "blue eyes": "#3a5fcd", "green eyes": "#2e8b57", "grey eyes": "#707880"}
MOUTHS = {"neutral mouth": "#6e3228", "smile": "#8c2828", "frown": "#502018"}
HAIR_COLOURS = {
    "black": "#1c1c1c",
    "brown": "#6a3d1e",
    "blonde": "#e8c25a",
    "ginger": "#c06148",
    "white": "#e6e6e6",
    "pink": "#e65aa0",
    "green": "#46b446",
    "purple": "#8e44ad",
}
HAIR_STYLES = ("bald", "short", "mohawk", "long", "afro", "spiky")
HEADWEAR = ("none", "beanie", "cap", "top hat", "bandana")
HAT_COLOURS = {
    "red": "#c0282d",
    "blue": "#2850b4",
    "green": "#2f7d32",
    "black": "#141414",
    "white": "#f0f0f0",
    "yellow": "#e6be28",
    "purple": "#6e2896",
    "orange": "#e67814",
}
GLASSES = ("none", "sunglasses", "glasses", "3d glasses")
SHIRT_COLOURS = {
    "white": "#f0f0f0",
    "black": "#1a1a1a",
    "grey": "#6e6e6e",
    "red": "#b4282d",
    "blue": "#28469b",
    "green": "#2f7d32",
    "yellow": "#dcb428",
    "brown": "#6e4628",
}
SUBJECTS = ("lad", "punk", "guy")

# Layout (row, column ranges are inclusive-exclusive like numpy slices).
HEAD_ROWS, HEAD_COLS = (5, 20), (7, 17)
EYE_ROW = 11
LEFT_EYE, RIGHT_EYE = (9, 11), (13, 15)
MOUTH_ROW = 16
BRIM_ROW, BRIM_COLS = 8, (17, 21)  # a cap's brim, right of the head (columns 19-20: nothing else reaches)
SHIRT_ROWS, SHIRT_COLS = (20, 24), (4, 20)


@dataclass(frozen=True)
class Punk:
    subject: str
    skin: str
    eyes: str
    mouth: str
    hair_style: str
    hair_colour: str
    headwear: str
    hat_colour: str
    glasses: str
    earring: bool
    cigarette: bool
    shirt: str
    background: str
    checkered: bool


ATTRIBUTES: dict[str, tuple] = {  # Punk field -> its values, in a fixed order (class indices of train/run.py)
    "subject": SUBJECTS,
    "skin": tuple(SKINS),
    "eyes": tuple(EYES),
    "mouth": tuple(MOUTHS),
    "hair_style": HAIR_STYLES,
    "hair_colour": tuple(HAIR_COLOURS),
    "headwear": HEADWEAR,
    "hat_colour": tuple(HAT_COLOURS),
    "glasses": GLASSES,
    "earring": (False, True),
    "cigarette": (False, True),
    "shirt": tuple(SHIRT_COLOURS),
    "background": tuple(BACKGROUNDS),
    "checkered": (False, True),
}


def random_punk(rng: np.random.Generator) -> Punk:
    def pick(options) -> str:
        return str(options[rng.integers(len(options))])

    return Punk(
        subject=pick(SUBJECTS),
        skin=pick(list(SKINS)),
        eyes=pick(list(EYES)),
        mouth=pick(list(MOUTHS)),
        hair_style=pick(HAIR_STYLES),
        hair_colour=pick(list(HAIR_COLOURS)),
        headwear=pick(HEADWEAR) if rng.random() < 0.6 else "none",
        hat_colour=pick(list(HAT_COLOURS)),
        glasses=pick(GLASSES[1:]) if rng.random() < 0.35 else "none",
        earring=bool(rng.random() < 0.3),
        cigarette=bool(rng.random() < 0.25),
        shirt=pick(list(SHIRT_COLOURS)),
        background=pick(list(BACKGROUNDS)),
        checkered=bool(rng.random() < 0.25),
    )


def _shade(colour: Colour, factor: float) -> Colour:
    return tuple(int(np.clip(round(c * factor), 0, 255)) for c in colour)  # type: ignore[return-value]


def render(punk: Punk) -> np.ndarray:
    """The 24x24 RGB sprite (uint8)."""
    image = np.zeros((GRID, GRID, 3), np.uint8)
    first, second = (rgb(c) for c in BACKGROUNDS[punk.background])
    image[:] = first
    if punk.checkered:  # 2x2-cell checks
        rows, cols = np.indices((GRID, GRID))
        image[((rows // 2) + (cols // 2)) % 2 == 1] = second
    skin = rgb(SKINS[punk.skin])
    hair = rgb(HAIR_COLOURS[punk.hair_colour])
    hat = rgb(HAT_COLOURS[punk.hat_colour])
    (top, bottom), (left, right) = HEAD_ROWS, HEAD_COLS

    # shirt and neck
    image[SHIRT_ROWS[0] : SHIRT_ROWS[1], SHIRT_COLS[0] : SHIRT_COLS[1]] = rgb(SHIRT_COLOURS[punk.shirt])
    image[SHIRT_ROWS[0], SHIRT_COLS[0] : SHIRT_COLS[1]] = OUTLINE
    image[SHIRT_ROWS[0] - 1 : SHIRT_ROWS[0] + 1, 9:14] = skin
    image[SHIRT_ROWS[0] - 1 : SHIRT_ROWS[0] + 1, 8] = OUTLINE
    image[SHIRT_ROWS[0] - 1 : SHIRT_ROWS[0] + 1, 14] = OUTLINE

    # long hair falls behind the head
    if punk.hair_style == "long":
        image[top : bottom - 1, left - 1 : right + 1] = hair
    if punk.hair_style == "afro":
        image[top - 3 : top + 9, left - 2 : right + 2] = hair
        image[top - 3, left - 2] = image[top - 3, right + 1] = image[top - 3 + 1, left - 2]  # keep square-ish

    # head: skin with a black outline, a darker nose, ear on the left
    image[top:bottom, left:right] = skin
    image[top, left:right] = OUTLINE
    image[top:bottom, left - 1] = OUTLINE
    image[top:bottom, right] = OUTLINE
    image[bottom - 1, left:right] = OUTLINE
    image[bottom - 3 : bottom - 1, left] = OUTLINE  # jaw
    image[12:15, left - 2] = OUTLINE  # ear
    image[12:14, left - 1] = skin
    image[13:15, 12] = _shade(skin, 0.8)

    # eyes, mouth
    for columns in (LEFT_EYE, RIGHT_EYE):
        image[EYE_ROW, columns[0]] = rgb("#ffffff")
        image[EYE_ROW, columns[1] - 1] = rgb(EYES[punk.eyes])
    image[EYE_ROW - 1, LEFT_EYE[0] : LEFT_EYE[1]] = _shade(skin, 0.7)  # brows
    image[EYE_ROW - 1, RIGHT_EYE[0] : RIGHT_EYE[1]] = _shade(skin, 0.7)
    mouth = rgb(MOUTHS[punk.mouth])
    image[MOUTH_ROW, 10:14] = mouth
    if punk.mouth == "smile":
        image[MOUTH_ROW - 1, 10] = image[MOUTH_ROW - 1, 13] = mouth
    elif punk.mouth == "frown":
        image[MOUTH_ROW + 1, 10] = image[MOUTH_ROW + 1, 13] = mouth

    # hair on top
    if punk.hair_style in ("short", "long", "afro"):
        image[top : top + 3, left:right] = hair
        image[top + 3, left : left + 2] = hair
    elif punk.hair_style == "mohawk":
        image[top - 3 : top + 1, 11:13] = hair
    elif punk.hair_style == "spiky":
        image[top : top + 2, left:right] = hair
        image[top - 1, left:right:2] = hair
        image[top - 2, left + 1 : right : 3] = hair

    # headwear
    if punk.headwear == "beanie":
        image[top - 2 : top + 3, left - 1 : right + 1] = hat
        image[top - 3, left + 1 : right - 1] = hat
        image[top + 2, left - 1 : right + 1] = _shade(hat, 0.75)  # band
    elif punk.headwear == "cap":
        image[top - 1 : top + 3, left:right] = hat
        image[top - 2, left + 1 : right - 1] = hat
        image[BRIM_ROW, right - 3 : BRIM_COLS[1]] = _shade(hat, 0.75)
        image[BRIM_ROW - 1, BRIM_COLS[0] : BRIM_COLS[1]] = _shade(hat, 0.75)
    elif punk.headwear == "top hat":
        image[top - 5 : top + 1, left + 1 : right - 1] = hat
        image[top - 3, left + 1 : right - 1] = _shade(hat, 0.6)
        image[top + 1, left - 2 : right + 2] = hat
    elif punk.headwear == "bandana":
        image[top : top + 3, left - 1 : right + 1] = hat
        image[top + 2, right : right + 2] = hat
        image[top + 3, right + 1] = hat

    # glasses
    if punk.glasses == "sunglasses":
        image[EYE_ROW - 1 : EYE_ROW + 1, LEFT_EYE[0] - 1 : RIGHT_EYE[1] + 1] = rgb("#0a0a0a")
    elif punk.glasses == "glasses":
        frame = rgb("#282828")
        for lo, hi in (LEFT_EYE, RIGHT_EYE):
            image[EYE_ROW - 1, lo - 1 : hi + 1] = frame
            image[EYE_ROW + 1, lo - 1 : hi + 1] = frame
        image[EYE_ROW, LEFT_EYE[1]] = image[EYE_ROW, LEFT_EYE[0] - 1] = frame
        image[EYE_ROW, RIGHT_EYE[0] - 1] = image[EYE_ROW, RIGHT_EYE[1]] = frame
    elif punk.glasses == "3d glasses":
        image[EYE_ROW - 1 : EYE_ROW + 1, LEFT_EYE[0] - 1 : RIGHT_EYE[1] + 1] = rgb("#f0f0f0")
        image[EYE_ROW - 1 : EYE_ROW + 1, LEFT_EYE[0] : LEFT_EYE[1]] = rgb("#dc2828")
        image[EYE_ROW - 1 : EYE_ROW + 1, RIGHT_EYE[0] : RIGHT_EYE[1]] = rgb("#28a0dc")

    if punk.earring:
        image[15, left - 2] = rgb("#d4af37")
    if punk.cigarette:
        image[MOUTH_ROW, right - 2 : right + 3] = rgb("#f0f0f0")
        image[MOUTH_ROW, right + 3] = rgb("#e65014")
        image[MOUTH_ROW - 3 : MOUTH_ROW - 1, right + 3] = rgb("#b4b4b4")
    return image


def palette(sprite: np.ndarray) -> list[str]:
    """The sprite's colours, most frequent first, as '#rrggbb'."""
    colours, counts = np.unique(sprite.reshape(-1, 3), axis=0, return_counts=True)
    return [hex_code(tuple(int(v) for v in colours[i])) for i in np.argsort(-counts, kind="stable")]  # type: ignore[arg-type]


def _hair_words(punk: Punk) -> str:
    if punk.hair_style == "bald":
        return "bald"
    style = {"short": "short", "mohawk": "mohawk", "long": "long", "afro": "afro", "spiky": "spiky"}[punk.hair_style]
    noun = "" if punk.hair_style == "mohawk" else " hair"
    return f"{style} {punk.hair_colour}{noun} ({HAIR_COLOURS[punk.hair_colour]})"


def _wearing(punk: Punk) -> list[str]:
    worn = []
    if punk.headwear != "none":
        worn.append(f"{punk.hat_colour} {punk.headwear} ({HAT_COLOURS[punk.hat_colour]})")
    if punk.glasses != "none":
        worn.append(punk.glasses)
    if punk.earring:
        worn.append("gold earring (#d4af37)")
    return worn


def _background_words(punk: Punk) -> str:
    return ("checkered " if punk.checkered else "") + f"{punk.background} background"


def full_caption(punk: Punk, sprite: np.ndarray) -> str:
    """The seed's trained caption format, hex codes included."""
    parts = [f"pixel art, 24x24, portrait of bespoke punk {punk.subject}", _hair_words(punk)]
    worn = _wearing(punk)
    if worn:
        parts.append("wearing " + " and ".join(worn))
    if punk.cigarette:
        parts.append("smoking a cigarette")
    parts += [
        f"{punk.eyes} ({EYES[punk.eyes]})",
        f"{punk.mouth}",
        f"{punk.skin} ({SKINS[punk.skin]})",
        f"{_background_words(punk)} ({BACKGROUNDS[punk.background][0]})",
        f"{punk.shirt} shirt ({SHIRT_COLOURS[punk.shirt]})",
        "palette: " + ", ".join(palette(sprite)[:4]),
    ]
    return ", ".join(parts) + PROMPT_SUFFIX


def short_description(punk: Punk, rng: np.random.Generator) -> tuple[str, set[str]]:
    """What a user might type ("lad with a red beanie, green background"), before the service's template: a random
    subset of the attributes, so a prompt that names only some of them still matches; and the attributes (Punk
    fields) it names."""
    things, named = [], {"subject"}
    if punk.headwear != "none" and rng.random() < 0.9:
        coloured = rng.random() < 0.6
        things.append(f"a {punk.hat_colour} {punk.headwear}" if coloured else f"a {punk.headwear}")
        named |= {"headwear", "hat_colour"} if coloured else {"headwear"}
    if punk.glasses != "none" and rng.random() < 0.9:
        things.append(punk.glasses)
        named.add("glasses")
    if punk.hair_style != "bald" and rng.random() < 0.4:
        things.append(_hair_words(punk).split(" (")[0])
        named |= {"hair_style", "hair_colour"}
    if punk.cigarette and rng.random() < 0.7:
        things.append("a cigarette")
        named.add("cigarette")
    if punk.earring and rng.random() < 0.5:
        things.append("an earring")
        named.add("earring")
    words = punk.subject
    if things:
        words += " with " + " and ".join(things)
    if rng.random() < 0.9:
        words += f", {_background_words(punk)}"
        named |= {"background", "checkered"}
    if rng.random() < 0.3:
        words += f", {punk.shirt} shirt"
        named.add("shirt")
    return words, named


def full_caption_names(punk: Punk) -> set[str]:
    """The attributes (Punk fields) full_caption names: all of them, the absence of headwear, glasses, earring and
    cigarette included, but no hat colour without a hat and no hair colour when bald."""
    named = set(ATTRIBUTES)
    if punk.headwear == "none":
        named.remove("hat_colour")
    if punk.hair_style == "bald":
        named.remove("hair_colour")
    return named


def attribute_labels(punk: Punk, named: set[str]) -> list[int]:
    """Class index of each attribute in ATTRIBUTES' order, -1 where the caption does not name it."""
    return [values.index(getattr(punk, name)) if name in named else -1 for name, values in ATTRIBUTES.items()]


assert list(ATTRIBUTES) == list(Punk.__dataclass_fields__)
assert PROMPT_PREFIX.endswith("bespoke punk ")  # full_caption writes the same prefix
