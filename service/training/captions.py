"""Captions in the seed's trained format, written from a sprite where the user gave none:

    pixel art, 24x24, portrait of bespoke punk <subject>, <colour> background (#hex), palette: #.., #.., #.., #..,
    sharp pixel edges, hard color borders, retro pixel art style

The background is the most common colour of the sprite's top row and side columns (where a portrait shows its
background), named after the closest colour `lora evaluate` knows, so its background score can read it back."""

import re
from collections import Counter

import numpy as np
from PIL import Image

from service.lora.evaluate import COLOURS
from service.pixelart import palette_hex
from service.prompts import PROMPT_PREFIX, PROMPT_SUFFIX

SUBJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _-]{0,39}")
PALETTE_COLOURS = 4  # hex codes in a caption's palette, as in the seed's captions


def check_subject(subject: str) -> str:
    """The subject (trigger word) as it goes into captions; ValueError naming the option when unusable."""
    subject = subject.strip()
    if not SUBJECT.fullmatch(subject):
        raise ValueError(f"subject: {subject!r} must be 1-40 letters, digits, spaces, '-' or '_' (e.g. 'lad', 'punk')")
    return subject


def background_hex(sprite: Image.Image) -> str:
    cells = np.asarray(sprite.convert("RGB"))
    border = np.concatenate([cells[0], cells[1:-1, 0], cells[1:-1, -1]])
    colour = Counter(map(tuple, border.tolist())).most_common(1)[0][0]
    return "#{:02x}{:02x}{:02x}".format(*colour)


def colour_name(code: str) -> str:
    rgb = np.array([int(code[i : i + 2], 16) for i in (1, 3, 5)])
    return min(COLOURS, key=lambda name: float(np.sum((np.array(COLOURS[name]) - rgb) ** 2)))


def write_caption(sprite: Image.Image, subject: str) -> str:
    background = background_hex(sprite)
    palette = ", ".join(palette_hex(sprite)[:PALETTE_COLOURS])
    return (
        f"{PROMPT_PREFIX}{subject}, {colour_name(background)} background ({background}), palette: {palette}"
        f"{PROMPT_SUFFIX}"
    )
