"""The engine on the smoke model: seeds, batching, chunked prompts, progress, post-processing."""

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.config import MAX_SEED, Settings
from service.delivery import summary
from service.engine import Engine, GenerationRequest
from service.errors import RequestError
from service.pixelart import QualitySignals
from service.prompts import PROMPT_SUFFIX

PROMPT = "lad with a red beanie, green background"


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def count_pipeline_calls(pipe, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of each call of the pipeline's class (the engine calls a per-call copy of its pipeline,
    with the request's sampler: the class is what every copy shares)."""
    calls: list[int] = []
    pipeline_class = type(pipe)
    original = pipeline_class.__call__

    def counting(self, **kwargs):
        calls.append(len(kwargs["prompt_embeds"]))
        return original(self, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", counting)
    return calls


def test_generation_returns_sprite_upscale_palette_and_quality(engine):
    steps_seen = []
    result = engine.generate(
        GenerationRequest(PROMPT, seed=7), progress=lambda done, total: steps_seen.append((done, total))
    )
    assert steps_seen == [(1, 2), (2, 2)]
    assert result.prompt.startswith("pixel art, 24x24, portrait of bespoke punk " + PROMPT)
    (image,) = result.images
    assert image.seed == 7
    assert image.raw.size == (512, 512)
    assert image.art.sprite.size == (24, 24) and image.art.image.size == (1024, 1024)
    assert isinstance(image.art.quality, QualitySignals)
    sprite_colours = {"#{:02x}{:02x}{:02x}".format(*c) for c in pixels(image.art.sprite).reshape(-1, 3)}
    assert sprite_colours == set(image.art.palette)
    described = summary(result)
    assert described["images"][0]["seed"] == 7 and described["truncated"] is False


def test_warm_up_fills_buckets_beyond_one_requests_images(engine, smoke_settings, monkeypatch):
    """A compiled server with max_batch_size 8 warms a bucket of 8 up the way the batcher fills it (two 4-image
    requests in one call); one 8-image request would be refused and the server would not start."""
    calls = count_pipeline_calls(engine.pipe, monkeypatch)
    wide = smoke_settings.model_dump() | {"compile": True, "batch_buckets": (1, 4, 8), "max_batch_size": 8}
    Engine(engine.pipe, Settings(**wide), engine.weights, engine.loras).warm_up()
    assert calls == [1, 4, 8]


def test_same_seed_same_image_and_other_seed_other_image(engine):
    first = engine.generate(GenerationRequest(PROMPT, seed=11)).images[0]
    again = engine.generate(GenerationRequest(PROMPT, seed=11)).images[0]
    other = engine.generate(GenerationRequest(PROMPT, seed=12)).images[0]
    assert np.array_equal(pixels(first.raw), pixels(again.raw))
    assert not np.array_equal(pixels(first.raw), pixels(other.raw))


def test_raw_images_are_the_bytes_of_diffusers_own_pil_output(engine, monkeypatch):
    """The engine converts to 8 bits on the model's device (to_pil) instead of diffusers' postprocess: same bytes.
    Each pipeline call is rendered again with diffusers' own output_type="pil", from the same generator states."""
    pil_images: list = []
    pipeline_class = type(engine.pipe)
    original = pipeline_class.__call__

    def also_pil(self, **kwargs):
        states = [generator.get_state() for generator in kwargs["generator"]]
        output = original(self, **kwargs)
        for generator, state in zip(kwargs["generator"], states, strict=True):
            generator.set_state(state)
        pil_images.extend(original(self, **kwargs | {"output_type": "pil"}).images)
        return output

    monkeypatch.setattr(pipeline_class, "__call__", also_pil)
    (rendered,) = engine.render([GenerationRequest(PROMPT, seed=31, num_outputs=2, num_inference_steps=2)])
    assert len(pil_images) == len(rendered.raws) == 2
    for ours, diffusers_own in zip(rendered.raws, pil_images, strict=True):
        assert ours.mode == diffusers_own.mode == "RGB"
        assert np.array_equal(np.asarray(ours), np.asarray(diffusers_own))
    assert not np.array_equal(np.asarray(rendered.raws[0]), np.asarray(rendered.raws[1]))


def test_render_then_finish_on_another_thread_is_generate(engine):
    """The API renders on the GPU thread and finishes elsewhere: the result must not depend on it."""
    request = GenerationRequest(PROMPT, seed=21, num_outputs=2)
    whole = engine.generate(request)
    (rendered,) = engine.render([request])
    assert [raw.size for raw in rendered.raws] == [(512, 512)] * 2 and rendered.smooth is None
    with ThreadPoolExecutor(1) as other_thread:
        finished = other_thread.submit(engine.finish, rendered).result()
    assert [image.seed for image in finished.images] == [21, 22]
    for split, together in zip(finished.images, whole.images, strict=True):
        assert np.array_equal(pixels(split.art.image.convert("RGB")), pixels(together.art.image.convert("RGB")))
    assert finished.timings["pipeline_s"] > 0 and finished.timings["postprocess_s"] > 0


def finish_during_a_render(engine, rendered):
    """engine.finish(rendered) called while the engine renders another request (from its progress callback), as
    the API snaps one batch while the GPU renders the next."""
    finished = []

    def progress(done: int, total: int) -> None:
        if not finished:
            finished.append(engine.finish(rendered))

    engine.render([GenerationRequest(PROMPT, seed=1, num_inference_steps=2)], progress)
    return finished[0]


def test_snap_processes_snap_exactly_as_this_process_and_stop_on_close(engine, smoke_settings, monkeypatch):
    """PUNKS_SNAP_PROCESSES: while the engine renders, images are snapped in spawned processes (started at warm-up,
    stopped by close), with the same sprites, palettes and signals as on the rendering process's own threads; an
    image snapped while nothing else runs stays on the calling thread (no hand-off to wait for)."""
    before = set(multiprocessing.active_children())
    settings = Settings(**smoke_settings.model_dump() | {"snap_processes": 2})
    in_processes = Engine(engine.pipe, settings, engine.weights, engine.loras)
    submitted = []
    try:
        in_processes.warm_up()
        workers = set(multiprocessing.active_children()) - before
        assert len(workers) == 2 and all(worker.is_alive() for worker in workers)
        pool = in_processes.snapper.processes
        monkeypatch.setattr(pool, "submit", lambda *args: submitted.append(args) or type(pool).submit(pool, *args))
        request = GenerationRequest(PROMPT, seed=31, num_outputs=2)
        (rendered,) = engine.render([request])
        here, alone = engine.finish(rendered), in_processes.finish(rendered)
        assert submitted == []
        there = finish_during_a_render(in_processes, rendered)
        assert len(submitted) == 2
    finally:
        in_processes.close()
    for mine, theirs in zip(here.images, there.images, strict=True):
        assert mine.art.sprite.tobytes() == theirs.art.sprite.tobytes()
        assert mine.art.image.tobytes() == theirs.art.image.tobytes() and mine.art.image.mode == theirs.art.image.mode
        assert mine.art.palette == theirs.art.palette and mine.art.quality == theirs.art.quality
    sprites = [[image.art.sprite.tobytes() for image in result.images] for result in (here, alone)]
    assert sprites[0] == sprites[1]
    assert not any(worker.is_alive() for worker in workers)


def test_a_dead_snap_process_falls_back_to_snapping_on_threads(engine, smoke_settings, caplog):
    """A snap worker killed (out of memory, by hand) breaks the pool for good: requests are then snapped on the
    rendering process's threads, the same sprites, and the log says so, instead of failing every request."""
    before = set(multiprocessing.active_children())
    settings = Settings(**smoke_settings.model_dump() | {"snap_processes": 1})
    in_processes = Engine(engine.pipe, settings, engine.weights, engine.loras)
    (rendered,) = engine.render([GenerationRequest(PROMPT, seed=41)])
    try:
        in_processes.warm_up()
        (worker,) = set(multiprocessing.active_children()) - before
        worker.kill()
        worker.join()
        snapped = finish_during_a_render(in_processes, rendered)
        again = finish_during_a_render(in_processes, rendered)
        assert again.images[0].art.sprite.tobytes() == snapped.images[0].art.sprite.tobytes()
    finally:
        in_processes.close()
    assert snapped.images[0].art.sprite.tobytes() == engine.finish(rendered).images[0].art.sprite.tobytes()
    assert "a snap process died" in caplog.text


def test_random_seed_is_chosen_and_reported(engine):
    result = engine.generate(GenerationRequest(PROMPT, num_outputs=2))
    seeds = [image.seed for image in result.images]
    assert all(0 <= seed <= MAX_SEED for seed in seeds) and seeds[1] == (seeds[0] + 1) % (MAX_SEED + 1)


def test_batched_requests_give_the_same_images_as_alone(engine, monkeypatch):
    alone = engine.generate(GenerationRequest(PROMPT, seed=21)).images[0]
    calls = count_pipeline_calls(engine.pipe, monkeypatch)
    batch = engine.generate_batch(
        [GenerationRequest("punk with sunglasses", seed=5, num_outputs=2), GenerationRequest(PROMPT, seed=21)]
    )
    assert calls == [3]  # both requests in one pipeline call (three images)
    assert [image.seed for image in batch[0].images] == [5, 6]
    batched = batch[1].images[0]
    assert np.abs(pixels(batched.raw) - pixels(alone.raw)).max() <= 2  # batched GEMMs round differently
    same_cells = (pixels(batched.art.sprite) == pixels(alone.art.sprite)).all(axis=2).mean()
    assert same_cells >= 0.95  # the smoke model draws noise, where a 1-level change can flip a palette merge


def test_long_prompt_is_encoded_in_chunks_and_reported_when_cut(engine):
    long_words = ", ".join(f"detail {i}" for i in range(40))
    result = engine.generate(GenerationRequest(long_words, seed=1))
    assert not result.dropped_words and "detail 39" in result.prompt
    hex_codes = " ".join(f"#{i:02d}b2c3" for i in range(62))  # 495 characters, ~430 CLIP tokens
    cut = engine.generate(GenerationRequest(hex_codes, seed=1))
    assert cut.dropped_words.endswith("#61b2c3") and summary(cut)["truncated"] is True
    assert cut.prompt.removesuffix(PROMPT_SUFFIX).endswith(hex_codes.removesuffix(" " + cut.dropped_words))


@pytest.mark.parametrize(
    "request_, field",
    [
        (GenerationRequest("   "), "prompt"),  # the shared bounds (tests/test_requests.py): checked before all else
        (GenerationRequest(PROMPT, seed=2**32), "seed"),
        (GenerationRequest("\U0001f600" * 500), "prompt"),  # one word of 500 emoji: none of it fits CLIP
        (GenerationRequest(PROMPT, lora="not-served"), "lora"),
    ],
)
def test_bad_requests_name_the_field(engine, request_, field):
    with pytest.raises(RequestError, match=f"^{field}:") as raised:
        engine.generate(request_)
    assert raised.value.field == field
    assert "e+" not in raised.value.reason  # bounds as written, 4294967295 not 4.29497e+09


def test_output_size_and_integer_scale_are_request_fields(engine):
    default = engine.generate(GenerationRequest(PROMPT, seed=3)).images[0]
    small = engine.generate(GenerationRequest(PROMPT, seed=3, output_size=100)).images[0]
    whole_cells = engine.generate(GenerationRequest(PROMPT, seed=3, output_size=100, integer_scale=True)).images[0]
    assert default.art.image.size == (1024, 1024) and small.art.image.size == (100, 100)
    assert whole_cells.art.image.size == (96, 96)  # 4 px cells
    assert np.array_equal(pixels(small.art.sprite), pixels(default.art.sprite))  # only the delivery differs


def test_negative_prompt_adds_to_the_fixed_one_and_changes_the_image(engine):
    from service.prompts import NEGATIVE_PROMPT

    plain, extra = engine.generate_batch(
        [
            GenerationRequest(PROMPT, seed=3, guidance_scale=20),  # strong guidance: the smoke model's text matters
            GenerationRequest(PROMPT, seed=3, guidance_scale=20, negative_prompt="  hat,   glasses "),
        ]
    )
    assert plain.negative_prompt == NEGATIVE_PROMPT
    assert extra.negative_prompt == f"{NEGATIVE_PROMPT}, hat, glasses"  # added, never replacing it
    assert np.abs(pixels(plain.images[0].raw) - pixels(extra.images[0].raw)).max() > 10
    (alone,) = engine.generate_batch(
        [GenerationRequest(PROMPT, seed=3, guidance_scale=20, negative_prompt="hat, glasses")]
    )
    assert np.abs(pixels(alone.images[0].raw) - pixels(extra.images[0].raw)).max() <= 2  # batched GEMMs


def test_num_inference_steps_and_guidance_scale_change_the_image(engine):
    base, fewer, weaker = engine.generate_batch(
        [
            GenerationRequest(PROMPT, seed=4, num_inference_steps=2, guidance_scale=7.5),
            GenerationRequest(PROMPT, seed=4, num_inference_steps=1, guidance_scale=7.5),
            GenerationRequest(PROMPT, seed=4, num_inference_steps=2, guidance_scale=1.0),
        ]
    )
    assert (fewer.steps, weaker.guidance) == (1, 1.0)
    for other in (fewer, weaker):
        assert np.abs(pixels(base.images[0].raw) - pixels(other.images[0].raw)).max() > 10
