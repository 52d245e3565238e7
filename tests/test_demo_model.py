"""The shipped demo model (devtools/demo_model, trained by train/run.py on generated portraits) through the real
engine: loaded as the fallback, its LoRA through the project's own guard and fuse, and what it draws
(train/demo_eval.py): over SEEDS seeds, the share the snapper's verdict calls pixel art with the rank-32 LoRA fused
and without it, and how often the prompted attribute (background colour, cap, sunglasses) is in the snapped sprite.
It draws at 256 px (the model was trained at 512 and 256) with few steps, so that 2 CPU cores finish in well under a
minute. The asserted bounds are what the model of 2026-12-02 15:45 UTC (text phase 359, VAE 1289, base 1345 steps on
the H200, the text encoder frozen; LoRA 1694 steps of batch 8 on the CPU) reaches here, with a margin
(bench/results/2026-12-02-demo-model-256.json): pixel art 94% with the LoRA, asserted >= 75%; prompted attribute 44%
(7 of 16), asserted >= 31% (the model before the text phase ignored the prompt: 19%). Without the LoRA it is 88% at
256 px and 8 steps (at 512 px and 25 steps see the README), so no upper bound is asserted there. The issue's goals
(<= 20% without the LoRA at this setting, attribute >= 70%) are not reached.
"""

from pathlib import Path

import numpy as np
import pytest

from devtools.demo import DEMO_DIR, DEMO_FOLDER, DEMO_LORA, demo_model_present
from service.config import Settings
from service.lora.inspect import inspect_sd15_lora
from service.weights.resolve import DEMO_NOTE, resolve_weights
from train import sprites
from train.demo_eval import has_background, has_cap, has_sunglasses, measure

SEEDS = 16
STEPS = 8
SIZE = 256


def test_detectors_find_the_attributes_in_the_generator_s_own_sprites():
    rng = np.random.default_rng(0)
    for punk in [sprites.random_punk(rng) for _ in range(300)]:
        sprite = sprites.render(punk)
        assert has_cap(sprite) == (punk.headwear == "cap"), punk
        assert has_sunglasses(sprite) == (punk.glasses == "sunglasses"), punk
        if punk.background in ("blue", "red", "green", "yellow"):
            assert has_background(sprite, punk.background), punk
            assert not has_background(sprite, "blue" if punk.background != "blue" else "red"), punk


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
def test_demo_model_draws_some_pixel_art_and_prompted_attributes_through_the_engine(tmp_path: Path):
    settings = Settings(
        weights_dir=tmp_path, fallback_model="demo", device="cpu", steps=STEPS, generation_size=SIZE, warmup=False
    )
    result = measure(settings, SEEDS)
    print(
        f"\ndemo model, {SEEDS} seeds, {STEPS} steps at {SIZE} px: pixel art {result['pixel_art_with_lora']:.0%} "
        f"with the LoRA, {result['pixel_art_without_lora']:.0%} without; prompted attribute present "
        f"{result['attribute_present']:.0%} {result['attribute_present_by_kind']}"
    )
    assert result["pixel_art_with_lora"] >= 0.75
    assert result["attribute_present"] >= 0.3125
