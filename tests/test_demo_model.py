"""The shipped demo model (devtools/demo_model, trained by train/run.py on generated portraits) through the real
engine: loaded as the fallback, its LoRA through the project's own guard and fuse, and what it draws
(train/demo_eval.py): every prompt of its set (all ten background colours, the four headwear kinds in all eight hat
colours, the eight hair colours, glasses, earring, cigarette) on one held-out seed, at 512 px, the product's size, with
12 steps so that 2 CPU cores finish in ~3.5 minutes: the share the snapper's verdict calls pixel art with the rank-32
LoRA fused and without it, and per attribute the share of images that show what the prompt names. The bounds are
issue 37's goals: pixel art >= 80% with the LoRA and <= 20% without; background colour >= 80%, headwear kind >= 80%,
headwear colour >= 70%.
"""

from pathlib import Path

import numpy as np
import pytest

from devtools.demo import DEMO_DIR, DEMO_FOLDER, DEMO_LORA, demo_model_present
from service.config import Settings
from service.lora.inspect import inspect_sd15_lora
from service.weights.resolve import DEMO_NOTE, resolve_weights
from train import sprites
from train.demo_eval import attributes, measure

SEEDS = 1  # per prompt
STEPS = 12
SIZE = 512


def test_detectors_read_the_generator_s_own_sprites():
    """The attribute readers agree with what train/sprites.py drew: always for background, glasses, earring,
    cigarette and hair colour; for headwear and its colour but where a hat hides in hair or a background of its
    own colour."""
    rng = np.random.default_rng(0)
    punks = [sprites.random_punk(rng) for _ in range(600)]
    hats = []
    for punk in punks:
        seen = attributes(sprites.render(punk))
        assert seen["background"] == punk.background, punk
        assert seen["glasses"] == punk.glasses, punk
        assert (seen["earring"], seen["cigarette"]) == (punk.earring, punk.cigarette), punk
        if punk.headwear == "none" and punk.hair_style not in ("bald", "mohawk"):
            assert (seen["headwear"], seen["hair_colour"]) == ("none", punk.hair_colour), punk
        hats.append(seen["headwear"] == punk.headwear and seen.get("hat_colour", punk.hat_colour) == punk.hat_colour)
    assert np.mean(hats) >= 0.97


needs_demo_model = pytest.mark.skipif(not demo_model_present(), reason="the demo model is not in this checkout")


@needs_demo_model
def test_no_weights_fall_back_loudly_to_the_demo_model(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level("WARNING"):
        source = resolve_weights(Settings(weights_dir=tmp_path, fallback_model="demo"))
    assert source.is_demo and not source.is_smoke and source.base_model == DEMO_DIR / DEMO_FOLDER
    assert "DEMO model" in caplog.text and DEMO_NOTE in caplog.text


@needs_demo_model
def test_the_demo_lora_is_a_kohya_rank_32_alpha_16_sd15_lora():
    info = inspect_sd15_lora(DEMO_DIR / DEMO_LORA, expected_rank=32)
    assert (info.rank, info.alphas, info.family) == (32, [16.0], "sd1")
    assert info.metadata["ss_network_dim"] == "32" and info.metadata["ss_network_alpha"] == "16"
    assert len(info.modules) == 216  # every UNet transformer and CLIP layer kohya wraps
    total = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file() and not f.is_symlink())
    assert total <= 25 * 10**6


@needs_demo_model
def test_demo_model_draws_pixel_art_only_with_its_lora_and_what_the_prompt_names(tmp_path: Path):
    settings = Settings(
        weights_dir=tmp_path, fallback_model="demo", device="cpu", steps=STEPS, generation_size=SIZE, warmup=False
    )
    result = measure(settings, SEEDS)
    right = result["right"]
    print(
        f"\ndemo model, {result['images']} images, {STEPS} steps at {SIZE} px: pixel art "
        f"{result['pixel_art_with_lora']:.0%} with the LoRA, {result['pixel_art_without_lora']:.0%} without; right: "
        f"{right} {result['right_by_value']}"
    )
    assert result["pixel_art_with_lora"] >= 0.80
    assert result["pixel_art_without_lora"] <= 0.20
    assert len(result["right_by_value"]["background"]) >= 8
    assert right["background"] >= 0.80
    assert right["headwear"] >= 0.80
    assert right["hat_colour"] >= 0.70


@needs_demo_model
def test_a_variation_keeps_most_cells_at_strength_0_3_and_changes_most_at_0_9(tmp_path: Path):
    """A demo-model sprite varied with three seeds under a description that names no attribute: the share of its 576
    cells that stay within RGB distance 20. At 12 steps on the CPU (2026-12-07): 0.87 at strength 0.3 (0.86-0.88 per
    seed), 0.23 at 0.9 (0.09-0.30). Under its own description ("lad with a red beanie, green background") the model
    redraws the same portrait at any strength (0.91 at 0.3, 0.81 at 0.9): it follows the colour words."""
    from service.engine import Engine, GenerationRequest

    engine = Engine.load(
        Settings(weights_dir=tmp_path, fallback_model="demo", device="cpu", steps=STEPS, warmup=False, snap_processes=0)
    )
    start = engine.generate(GenerationRequest("lad with a red beanie, green background", seed=1)).images[0].art.sprite
    prompt = "punk"
    kept = {}
    for strength in (0.3, 0.9):
        result = engine.generate(GenerationRequest(prompt, seed=11, num_outputs=3, image=start, strength=strength))
        distances = [
            np.linalg.norm(np.asarray(image.art.sprite, int) - np.asarray(start, int), axis=-1)
            for image in result.images
        ]
        kept[strength] = float(np.mean([(distance <= 20).mean() for distance in distances]))
    print(f"\ndemo model, {STEPS} steps: cells kept {kept[0.3]:.0%} at strength 0.3, {kept[0.9]:.0%} at 0.9")
    assert kept[0.3] >= 0.6
    assert kept[0.9] <= 0.4
