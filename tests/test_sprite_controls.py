"""The pixel-art controls (service/sprite_controls.py) on synthetic sprites whose truth is known: the training
portraits' generator (train/sprites.py: flat and 2x2-checkered backgrounds) and the snapper's test punks."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from service import config
from service.errors import RequestError
from service.pixelart import to_pixel_art, upscale
from service.requests import GenerationRequest
from service.sprite_controls import (
    PRESETS,
    apply_controls,
    background_mask,
    check_background,
    map_to_palette,
    palette_colours,
    rgb_codes,
)
from tests.synthetic_sprites import Degradation, degrade, make_punk
from train import sprites

PUNKS = 60


def punk(seed: int, **changes) -> tuple[sprites.Punk, np.ndarray]:
    drawn = dataclasses.replace(sprites.random_punk(np.random.default_rng(seed)), **changes)
    return drawn, sprites.render(drawn)


def true_background(drawn: sprites.Punk) -> np.ndarray:
    """The cells that change when only the background colour changes: the background, by construction."""
    other = "teal" if drawn.background != "teal" else "purple"
    return np.any(sprites.render(drawn) != sprites.render(dataclasses.replace(drawn, background=other)), axis=-1)


def colours_of(pixels: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in colour) for colour in pixels.reshape(-1, pixels.shape[-1])}


def palette_set(codes: tuple[str, ...]) -> set[tuple[int, ...]]:
    return colours_of(rgb_codes(codes))


# --- palette ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["pico-8", "game-boy"])
def test_every_cell_takes_a_palette_colour_and_distinct_colours_stay_distinct_while_there_is_room(preset):
    palette = PRESETS[preset]
    for seed in range(PUNKS):
        sprite = np.asarray(make_punk(seed))
        mapped, mask = apply_controls(sprite, palette, "keep")
        assert mask is None
        assert colours_of(mapped) <= palette_set(palette)
        source = np.unique(sprite.reshape(-1, 3), axis=0, return_inverse=True)[1].ravel()
        target = np.unique(mapped.reshape(-1, 3), axis=0, return_inverse=True)[1].ravel()
        kept_apart = len(np.unique(target))
        assert kept_apart == min(len(np.unique(source)), len(palette)), seed
        # one colour in, one colour out: cells of one sprite colour never split
        assert all(len(np.unique(target[source == colour])) == 1 for colour in np.unique(source))


def test_a_palette_holding_the_sprite_colours_changes_nothing():
    sprite = np.asarray(make_punk(3))
    own = tuple("#{:02x}{:02x}{:02x}".format(*c) for c in np.unique(sprite.reshape(-1, 3), axis=0))
    extra = ("#123456", "#fedcba", "#00ff00")
    mapped, _ = apply_controls(sprite, extra + own, "keep")
    assert np.array_equal(mapped, sprite)


def test_an_eye_next_to_the_skin_keeps_its_own_colour_where_independent_lookups_would_merge_them():
    """Skin and a close eye colour share their nearest palette colour; the assignment gives the one-cell eye the
    next best, the skin (many cells) keeps the nearest."""
    skin, eye = (240, 200, 160), (225, 185, 150)
    sprite = np.full((24, 24, 3), skin, dtype=np.uint8)
    sprite[10, 9] = eye
    palette = ("#f0c8a0", "#806040", "#000000")
    mapped, _ = apply_controls(sprite, palette, "keep")
    assert tuple(mapped[0, 0]) == (0xF0, 0xC8, 0xA0)
    assert tuple(mapped[10, 9]) == (0x80, 0x60, 0x40)


def test_nearest_is_perceptual_and_fewer_palette_colours_merge_the_closest_sprite_colours_first():
    colours = np.array([[250, 250, 250], [245, 245, 245], [10, 10, 10], [200, 30, 30]], dtype=np.uint8)
    counts = np.array([10, 10, 10, 10])
    mapped = map_to_palette(colours, counts, rgb_codes(("#ffffff", "#000000", "#ff0000")))
    assert [tuple(c) for c in mapped] == [(255, 255, 255), (255, 255, 255), (0, 0, 0), (255, 0, 0)]


# --- background ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkered", [False, True], ids=["flat", "2x2 checkered"])
def test_the_background_mask_is_exactly_the_background_of_the_training_portraits(checkered):
    tested = 0
    for seed in range(PUNKS):
        drawn, sprite = punk(seed, checkered=checkered)
        backgrounds = palette_set(sprites.BACKGROUNDS[drawn.background])
        truth = true_background(drawn)
        if colours_of(sprite[~truth]) & backgrounds:  # a hair or hat in the background's own colour: ambiguous
            continue
        assert np.array_equal(background_mask(sprite), truth), seed
        tested += 1
    assert tested >= PUNKS // 2


def test_one_cell_checks_are_a_background_too():
    for seed in range(20):
        sprite = np.asarray(make_punk(seed))
        border = np.concatenate([sprite[0], sprite[-1], sprite[:, 0], sprite[:, -1]])
        mask = background_mask(sprite)
        assert mask[0, 0] and mask[0, 1] and mask[1, 0], seed  # both colours of a one-cell checker, or a flat one
        assert len(colours_of(sprite[mask])) <= 2
        assert colours_of(sprite[mask]) <= colours_of(border)


def test_hair_touching_the_border_stays_and_nothing_inside_the_outline_is_taken():
    drawn, sprite = punk(4, hair_style="long", hair_colour="black", background="blue", checkered=False)
    truth = true_background(drawn)
    top, _ = sprites.HEAD_ROWS
    left, _ = sprites.HEAD_COLS
    sprite[: top + 1, left + 2 : left + 5] = sprites.rgb(sprites.HAIR_COLOURS["black"])  # hair up to the top edge
    truth[: top + 1, left + 2 : left + 5] = False
    inside = sprite.copy()
    inside[15, 12] = sprites.rgb(sprites.BACKGROUNDS["blue"][0])  # the background's colour inside the face
    mask = background_mask(inside)
    assert not mask[0, left + 2 : left + 5].any()
    assert not mask[15, 12]
    assert np.array_equal(mask, truth)


def test_transparent_and_recoloured_backgrounds_through_the_snap_of_a_render():
    drawn, sprite = punk(11, checkered=True)
    truth = true_background(drawn)
    render = degrade(Image.fromarray(sprite), np.random.default_rng(1), Degradation.random(np.random.default_rng(1)))
    art = to_pixel_art(render, palette=PRESETS["pico-8"], background="transparent")
    assert art.background is not None and np.array_equal(art.background, truth)
    alpha = np.asarray(art.sprite)[..., 3]
    assert art.sprite.mode == "RGBA" and np.array_equal(alpha == 0, truth) and set(np.unique(alpha)) == {0, 255}
    big = np.asarray(art.image.convert("RGBA"))
    assert np.array_equal(big[..., 3] == 0, np.asarray(upscale(Image.fromarray(truth), 1024)))
    assert colours_of(big[..., :3][big[..., 3] > 0]) <= palette_set(PRESETS["pico-8"])
    assert set(art.palette) <= set(PRESETS["pico-8"])

    recoloured = to_pixel_art(render, background="#ff00ff")
    pixels = np.asarray(recoloured.sprite)
    assert colours_of(pixels[truth]) == {(255, 0, 255)} and (255, 0, 255) not in colours_of(pixels[~truth])
    kept = to_pixel_art(render)
    assert kept.background is None and kept.sprite.mode == "RGB"


# --- the request's words --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, why",
    [
        ("gameboy", "unknown preset"),
        (["#12345g"], "colour 1 is not"),
        (["#fff"], "colour 1 is not"),
        (["#000000", 7], "colour 2 is not"),
        (["#000000"] * (config.MAX_PALETTE_COLORS + 1), "at most 64 colours"),
        ([], "non-empty list"),
        (5, "non-empty list"),
    ],
)
def test_a_bad_palette_is_refused_naming_the_field(value, why):
    with pytest.raises(RequestError, match=why) as error:
        GenerationRequest("punk", palette=value).check()
    assert error.value.field == "palette"


def test_palettes_and_backgrounds_that_are_accepted():
    assert palette_colours("PICO-8") == PRESETS["pico-8"] and len(PRESETS["pico-8"]) == 16
    assert palette_colours(["#ABCDEF", "#abcdef", "#000000"]) == ("#abcdef", "#000000")
    assert palette_colours(["#000000"] * config.MAX_PALETTE_COLORS) == ("#000000",)
    assert [check_background(v) for v in ("keep", "transparent", "#00FF00")] == ["keep", "transparent", "#00ff00"]
    for bad in ("none", "#00ff0", "", None, 3):
        with pytest.raises(RequestError) as error:
            GenerationRequest("punk", background=bad).check()  # type: ignore[arg-type]
        assert error.value.field == "background"


@pytest.mark.parametrize("output_format", ["png", "webp"])
def test_delivered_files_keep_the_transparency_and_only_palette_colours(output_format):
    import io

    from service.delivery import encode

    drawn, sprite = punk(12)
    render = upscale(Image.fromarray(sprite), 512).convert("RGB")
    art = to_pixel_art(render, palette=PRESETS["game-boy"], background="transparent")
    delivered = np.asarray(Image.open(io.BytesIO(encode(art.image, output_format))).convert("RGBA"))
    assert np.array_equal(delivered, np.asarray(art.image.convert("RGBA")))  # lossless, alpha included
    assert art.background is not None and art.background.sum() >= true_background(drawn).sum()
    assert np.array_equal(delivered[..., 3] == 0, np.asarray(upscale(Image.fromarray(art.background), 1024)) == 1)
    assert colours_of(delivered[..., :3][delivered[..., 3] == 255]) <= palette_set(PRESETS["game-boy"])
