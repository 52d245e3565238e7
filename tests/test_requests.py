"""Requests and their check against the shared bounds (service/requests.py), without an engine: what only a loaded
engine can judge (a served LoRA, a prompt CLIP would drop) is in tests/test_engine.py."""

import pytest

from service.config import MAX_IMAGES
from service.errors import RequestError
from service.requests import GenerationRequest, request_sizes

PROMPT = "lad with a red beanie, green background"


@pytest.mark.parametrize(
    "request_, field",
    [
        (GenerationRequest("   "), "prompt"),
        (GenerationRequest("x" * 501), "prompt"),
        (GenerationRequest(PROMPT, seed=-1), "seed"),
        (GenerationRequest(PROMPT, seed=2**32), "seed"),
        (GenerationRequest(PROMPT, num_outputs=5), "num_outputs"),
        (GenerationRequest(PROMPT, num_outputs=0), "num_outputs"),
        (GenerationRequest(PROMPT, num_inference_steps=0), "num_inference_steps"),
        (GenerationRequest(PROMPT, num_inference_steps=101), "num_inference_steps"),
        (GenerationRequest(PROMPT, guidance_scale=-1), "guidance_scale"),
        (GenerationRequest(PROMPT, guidance_scale=21), "guidance_scale"),
        (GenerationRequest(PROMPT, guidance_scale=float("nan")), "guidance_scale"),
        (GenerationRequest(PROMPT, guidance_scale=float("inf")), "guidance_scale"),
        (GenerationRequest("lad \ud800"), "prompt"),
        (GenerationRequest("\u200b\u200b \u2060\t"), "prompt"),  # only zero-width and space characters
        (GenerationRequest(PROMPT, seed=5.0), "seed"),  # type: ignore[arg-type]
        (GenerationRequest(PROMPT, num_outputs=True), "num_outputs"),
        (GenerationRequest(PROMPT, output_size=23), "output_size"),
        (GenerationRequest(PROMPT, output_size=4097), "output_size"),
        (GenerationRequest(PROMPT, output_format="jpeg"), "output_format"),  # type: ignore[arg-type]
        (GenerationRequest(PROMPT, upscaler="bicubic"), "upscaler"),  # type: ignore[arg-type]
        (GenerationRequest(PROMPT, integer_scale="yes"), "integer_scale"),  # type: ignore[arg-type]
        (GenerationRequest(PROMPT, lora="   "), "lora"),
        (GenerationRequest(PROMPT, lora_scale=2.5), "lora_scale"),
        (GenerationRequest(PROMPT, lora_scale=float("nan")), "lora_scale"),
        (GenerationRequest(PROMPT, negative_prompt="x" * 501), "negative_prompt"),
        (GenerationRequest(PROMPT, negative_prompt=3), "negative_prompt"),  # type: ignore[arg-type]
    ],
)
def test_bad_requests_name_the_field(request_, field):
    with pytest.raises(RequestError, match=f"^{field}:") as raised:
        request_.check()
    assert raised.value.field == field
    assert "e+" not in raised.value.reason  # bounds as written, 4294967295 not 4.29497e+09


def test_a_request_in_bounds_passes():
    GenerationRequest(
        PROMPT,
        seed=0,
        num_outputs=MAX_IMAGES,
        num_inference_steps=1,
        guidance_scale=0,
        negative_prompt="blurry",
        lora="other",
        lora_scale=0.5,
        output_size=24,
    ).check()


def test_request_sizes_fill_a_batch_with_the_fewest_requests():
    assert request_sizes(1) == [1]
    assert request_sizes(MAX_IMAGES) == [MAX_IMAGES]
    assert request_sizes(2 * MAX_IMAGES + 1) == [MAX_IMAGES, MAX_IMAGES, 1]
