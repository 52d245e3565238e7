"""GPU checks, run on a CUDA machine (skipped without one):

    python -m pytest tests/gpu -q                           # smoke model + full-size random SD1.5
    PUNKS_GPU_COMPILE=1 python -m pytest tests/gpu -q       # also torch.compile vs eager (smoke model)
    PUNKS_GPU_COMPILE=full python -m pytest tests/gpu -q    # ... and on the full-size model

The full-size model is SD1.5's real architecture with random weights (speed and numerics of the
code paths do not depend on the weights' values).
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from devtools.smoke import build_full_size_pipeline, save_random_model, save_smoke_model
from service.acceleration import GraphedTextEncoder
from service.config import Settings
from service.engine import Engine, GenerationRequest
from service.lora.fuse import count_lora_layers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PROMPT = "lad with a red beanie, green background"


@pytest.fixture(scope="module", params=["smoke", "full-size"])
def weights(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "smoke":
        return save_smoke_model(folder)
    return save_random_model(folder, build_full_size_pipeline().to(torch.float16), single_file=False)


def settings_for(weights: Path, **overrides) -> Settings:
    return Settings(weights_dir=weights, base_model=weights / "stable-diffusion-v1-5", steps=8, **overrides)


@pytest.fixture(scope="module")
def engine(weights) -> Engine:
    return Engine.load(settings_for(weights))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_fp16_on_cuda_with_lora_fused_and_no_wrappers(engine):
    assert engine.pipe.unet.dtype == torch.float16 and engine.pipe.device.type == "cuda"
    assert count_lora_layers(engine.pipe) == 0
    assert engine.loras.default.rank == 32


def test_output_has_no_nan_and_snaps(engine):
    result = engine.generate(GenerationRequest(PROMPT, seed=3))
    image = result.images[0]
    raw = pixels(image.raw)
    assert raw.std() > 0  # an all-black image is what NaN latents decode to
    assert image.art.sprite.size == (24, 24) and image.art.image.size == (1024, 1024)
    latents = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16)
    ids = engine.pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = engine.pipe.text_encoder(ids.to("cuda"))[0]
    assert torch.isfinite(text).all()
    with torch.no_grad():
        out = engine.pipe.unet(latents, torch.tensor(500, device="cuda"), text).sample
    assert torch.isfinite(out).all()


def test_batch_matches_single_per_seed(engine):
    alone = engine.generate(GenerationRequest(PROMPT, seed=42)).images[0]
    batch = engine.generate_batch(
        [GenerationRequest("punk with a cap", seed=7, num_outputs=3), GenerationRequest(PROMPT, seed=42)]
    )
    batched = batch[1].images[0]
    difference = np.abs(pixels(batched.raw) - pixels(alone.raw))
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 8  # fp16 batched GEMMs round differently


@pytest.mark.skipif(not os.environ.get("PUNKS_GPU_COMPILE"), reason="set PUNKS_GPU_COMPILE=1 (compiles for minutes)")
def test_compiled_engine_matches_eager_within_fp16_tolerance(engine, weights, tmp_path):
    if weights.name.startswith("full-size") and os.environ.get("PUNKS_GPU_COMPILE") != "full":
        pytest.skip("compiling the full-size UNet takes minutes: PUNKS_GPU_COMPILE=full (bench/ measures it)")
    eager = engine.generate(GenerationRequest(PROMPT, seed=5)).images[0]
    # one bucket, so one compile per module: a single image runs padded to 4, as a batch of 3 would
    compiled_engine = Engine.load(settings_for(weights, compile=True, batch_buckets=(4,), compile_cache_dir=tmp_path))
    compiled = compiled_engine.generate(GenerationRequest(PROMPT, seed=5)).images[0]
    difference = np.abs(pixels(compiled.raw) - pixels(eager.raw))
    assert difference.mean() < 1.0 and np.percentile(difference, 99) <= 8
    three = compiled_engine.generate(GenerationRequest(PROMPT, seed=5, num_outputs=3)).images
    assert np.abs(pixels(three[0].raw) - pixels(compiled.raw)).mean() < 1.0


def test_graphed_text_encoder_matches_the_eager_one_and_follows_its_weights(engine):
    """The compiled engine's prompt encoder (service.acceleration.GraphedTextEncoder): same hidden states as the
    eager encoder for captured shapes, eager ones for others, and it sees weights changed in place or moved to new
    memory (then it captures its graphs again)."""
    encoder = engine.pipe.text_encoder
    graphed = GraphedTextEncoder(encoder, {1, 2}, 77)
    ids = torch.randint(0, encoder.config.vocab_size, (2, 77), device="cuda")
    norm = next(module for name, module in encoder.named_modules() if name.endswith("final_layer_norm"))
    original = norm.weight

    def check(token_ids: torch.Tensor) -> torch.Tensor:
        assert set(graphed._graphs) == {(1, 77), (2, 77)}  # captured, so the comparison below is graph vs eager
        with torch.inference_mode():
            hidden, eager = graphed(token_ids), encoder(token_ids)[0]
        torch.testing.assert_close(hidden, eager, rtol=1e-3, atol=1e-3)
        return hidden

    before = check(ids)
    check(ids[:1])
    check(ids[:1].repeat(3, 1))  # not captured: runs eagerly
    try:
        with torch.no_grad():
            norm.weight.mul_(2)  # in place
        assert not torch.allclose(check(ids), before, atol=1e-2)
        with torch.no_grad():
            norm.weight.div_(2)
        norm.weight = torch.nn.Parameter(original.detach() * 3)  # new memory: the graphs are captured again
        assert not torch.allclose(check(ids), before, atol=1e-2)
    finally:  # the module-scoped engine serves the tests after this one
        norm.weight = original
    torch.testing.assert_close(check(ids), before, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not os.environ.get("PUNKS_GPU_COMPILE"), reason="set PUNKS_GPU_COMPILE=1 (compiles for minutes)")
def test_switching_sampler_on_the_compiled_engine_does_not_recompile(weights, tmp_path):
    """A scheduler's steps run outside the CUDA graphs of the UNet and VAE: after one warm-up per sampler family
    of timestep dtype, changing the sampler per request compiles nothing new (dynamo's unique graphs unchanged)."""
    from torch._dynamo.utils import counters

    from service.samplers import SAMPLER_NAMES

    engine = Engine.load(settings_for(weights, compile=True, batch_buckets=(4,), compile_cache_dir=tmp_path))
    for sampler in SAMPLER_NAMES:  # first use of each: any recompile would show here already
        engine.generate(GenerationRequest(PROMPT, seed=5, num_inference_steps=4, sampler=sampler))
    compiled = counters["stats"]["unique_graphs"]
    for sampler in [*SAMPLER_NAMES, *reversed(SAMPLER_NAMES)]:
        image = engine.generate(GenerationRequest(PROMPT, seed=5, num_inference_steps=4, sampler=sampler)).images[0]
        assert np.isfinite(pixels(image.raw)).all()
    assert counters["stats"]["unique_graphs"] == compiled
    assert counters["recompiles"] == {} or sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])
