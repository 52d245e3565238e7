"""Per-request samplers (issue 35): the table (service/samplers.py), the engine's grouping by sampler, seeds per
sampler, and the native API, on the CPU with the smoke model."""

import numpy as np
import pytest

from service import config, samplers
from service.engine import Engine, GenerationRequest
from service.errors import RequestError
from service.loading import SCHEDULERS
from tests.live_server import SpyEngine, behind_blocker, post

PROMPT = "ape with a cap"


def test_names_aliases_and_schedules_resolve():
    assert samplers.lookup("euler A").name == "Euler a" and samplers.lookup("k_euler_ancestral").name == "Euler a"
    assert samplers.lookup("PLMS").name == "PNDM" and samplers.lookup("k_dpmpp_2m_ka").name == "DPM++ 2M Karras"
    assert samplers.with_schedule(samplers.lookup("DPM++ 2M"), "Karras").name == "DPM++ 2M Karras"
    assert samplers.with_schedule(samplers.lookup("DPM++ SDE"), "karras").name == "DPM++ SDE Karras"
    assert samplers.with_schedule(samplers.lookup("DPM++ 2M Karras"), "Karras").name == "DPM++ 2M Karras"
    assert samplers.with_schedule(samplers.lookup("Euler a"), "Automatic").name == "Euler a"
    with pytest.raises(RequestError, match="^scheduler: 'Karras' is accepted with DPM\\+\\+ 2M, "):
        samplers.with_schedule(samplers.lookup("Euler a"), "Karras")
    with pytest.raises(RequestError, match="^scheduler: unknown scheduler 'exponential'; accepted: Automatic, Karras"):
        samplers.with_schedule(samplers.lookup("Euler"), "exponential")
    with pytest.raises(RequestError, match="^sampler: unknown sampler 'DPM fast'; accepted: Euler, Euler a, DPM"):
        samplers.lookup("DPM fast")
    with pytest.raises(RequestError, match="^sampler: unknown sampler 3;"):
        GenerationRequest(PROMPT, sampler=3).check()  # type: ignore[arg-type]


def test_every_sampler_builds_its_diffusers_scheduler_and_the_defaults_map_onto_the_table(engine: Engine):
    import diffusers

    for name, sampler in samplers.SAMPLERS.items():
        built = sampler.build(engine.pipe.scheduler.config)
        assert type(built) is getattr(diffusers, sampler.scheduler), name
        assert built.config.get("use_karras_sigmas", False) == name.endswith("Karras"), name
        assert (built.config.get("algorithm_type") == "sde-dpmsolver++") == ("SDE" in name), name
    assert set(samplers.DEFAULTS) == set(config.SCHEDULERS)
    for setting, name in samplers.DEFAULTS.items():
        assert samplers.SAMPLERS[name].scheduler == SCHEDULERS[setting].__name__


@pytest.mark.parametrize("sampler", samplers.SAMPLER_NAMES)
def test_a_seed_gives_the_same_image_per_sampler_in_any_batch_of_the_same_size(fast_engine: Engine, sampler: str):
    """Ancestral and SDE samplers draw their noise from each image's own generator: the batch mates change
    nothing (same batch size: bitwise), and alone the image is close (other GEMM rounding, as
    tests/test_http_determinism.py says of the default sampler)."""
    request = GenerationRequest(PROMPT, seed=42, num_inference_steps=2, sampler=sampler)
    mates = [
        GenerationRequest("zombie", seed=5, num_inference_steps=2, sampler=sampler),
        GenerationRequest("alien", seed=9, num_outputs=2, num_inference_steps=2, sampler=sampler),
    ]
    first = fast_engine.render([request, *mates])[0].raws[0]
    others = [
        GenerationRequest("girl", seed=1, num_outputs=2, num_inference_steps=2, sampler=sampler),
        GenerationRequest("boy", num_inference_steps=2, sampler=sampler),
    ]
    second = fast_engine.render([others[0], request, others[1]])[1].raws[0]
    assert first.tobytes() == second.tobytes()
    alone = fast_engine.render([request])[0].raws[0]
    difference = np.abs(np.asarray(alone, np.int16) - np.asarray(first, np.int16))
    assert difference.max() <= 2 and difference.mean() < 0.1


def test_each_sampler_through_the_server_different_samplers_differ_and_a_sampler_repeats(live: str):
    images = {}
    for sampler in samplers.SAMPLER_NAMES:
        response = post(
            live, {"prompt": PROMPT, "seed": 11, "num_inference_steps": 3, "sampler": sampler, "return_sprites": True}
        )
        assert response.status_code == 200, response.text
        assert response.json()["sampler"] == sampler
        images[sampler] = response.json()["images"][0]["image"]
    assert len(set(images.values())) == len(images)  # every sampler draws another picture from the same seed
    for sampler in ("Euler a", "DPM++ SDE", "DDIM"):  # stochastic ones and a deterministic one
        again = post(
            live, {"prompt": PROMPT, "seed": 11, "num_inference_steps": 3, "sampler": sampler, "return_sprites": True}
        )
        assert again.json()["images"][0]["image"] == images[sampler]
    default = post(live, {"prompt": PROMPT, "seed": 11, "num_inference_steps": 3})
    assert default.json()["sampler"] == "DPM++ 2M" and default.json()["images"][0]["image"] == images["DPM++ 2M"]


def test_mixed_sampler_requests_are_batched_by_sampler(live: str, spy: SpyEngine, monkeypatch):
    groups: list[list[str]] = []
    run_pipeline = spy.engine._run_pipeline

    def recording(group, *args):
        groups.append([job.sampler for job in group])
        return run_pipeline(group, *args)

    monkeypatch.setattr(spy.engine, "_run_pipeline", recording)
    bodies = [
        {"prompt": "ape", "seed": 1, "sampler": "Euler a"},
        {"prompt": "zombie", "seed": 2, "sampler": "DPM++ 2M"},
        {"prompt": "alien", "seed": 3, "sampler": "Euler a"},
        {"prompt": "girl", "seed": 4},  # the default, DPM++ 2M
    ]
    responses = behind_blocker(live, spy, bodies)
    assert [r.status_code for r in responses] == [200] * 4
    assert sorted(spy.calls[-1]) == ["alien", "ape", "girl", "zombie"]  # one engine call for the four
    assert sorted(groups[-2:]) == [["DPM++ 2M", "DPM++ 2M"], ["Euler a", "Euler a"]]  # two pipeline calls
    assert [r.json()["sampler"] for r in responses] == ["Euler a", "DPM++ 2M", "Euler a", "DPM++ 2M"]


def test_unknown_sampler_is_422_naming_the_field_and_listing_the_accepted(live: str):
    response = post(live, {"prompt": PROMPT, "sampler": "DPM fast"})
    assert response.status_code == 422
    detail = response.text
    assert "sampler" in detail and all(name in detail for name in samplers.SAMPLER_NAMES)


def test_openapi_lists_the_samplers(live: str):
    import httpx

    schema = httpx.get(f"{live}/openapi.json").json()
    field = schema["components"]["schemas"]["GenerateRequest"]["properties"]["sampler"]
    assert field["anyOf"][0]["enum"] == list(samplers.SAMPLER_NAMES)
