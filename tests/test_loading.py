"""Loading SD1.5 offline (folder and single file), the tokenizer check, the LoRA guard and fusing."""

import inspect
import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from devtools.smoke import SMOKE_FOLDER, SMOKE_LORA, SMOKE_SINGLE_FILE
from service.config import Settings
from service.loading import OneDevicePipeline, WeightsError, load_base_pipeline
from service.lora.fuse import check_lora_matches_model, count_lora_layers, fuse_lora, kohya_targets
from service.lora.inspect import LoraError, inspect_lora, inspect_sd15_lora
from service.weights.resolve import resolve_weights
from tests.lora_files import sdxl_modules, write_lora

ATTENTION = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1x1 conv


def load_smoke(smoke_dir: Path, single_file: bool = False):
    folder = smoke_dir / SMOKE_FOLDER
    path = smoke_dir / SMOKE_SINGLE_FILE if single_file else folder
    return load_base_pipeline(path, config_dir=folder, dtype=torch.float32)


def test_no_weights_falls_back_loudly_to_the_smoke_model(smoke_settings, caplog):
    with caplog.at_level(logging.WARNING):
        source = resolve_weights(smoke_settings)
    assert source.is_smoke and source.lora.name == SMOKE_LORA
    assert "RANDOM smoke model" in caplog.text and "NOT meaningful" in caplog.text


def test_missing_weights_fail_with_the_file_and_where_to_put_it(tmp_path):
    settings = Settings(weights_dir=tmp_path, allow_smoke_model=False)
    with pytest.raises(WeightsError) as error:
        resolve_weights(settings)
    message = str(error.value)
    assert str(tmp_path / "bespoke_punks.safetensors") in message
    assert str(tmp_path / "v1-5-pruned-emaonly.safetensors") in message
    assert "python -m service weights download" in message


def test_explicit_base_model_that_is_missing_is_an_error_not_a_fallback(tmp_path):
    settings = Settings(weights_dir=tmp_path, base_model=tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="nope.safetensors"):
        resolve_weights(settings)


def test_real_weights_are_preferred_when_present(tmp_path, smoke_dir):
    shutil.copy(smoke_dir / SMOKE_SINGLE_FILE, tmp_path / "v1-5-pruned-emaonly.safetensors")
    shutil.copy(smoke_dir / SMOKE_LORA, tmp_path / "bespoke_punks.safetensors")
    source = resolve_weights(Settings(weights_dir=tmp_path))
    assert not source.is_smoke and source.base_model.name == "v1-5-pruned-emaonly.safetensors"


def test_folder_and_single_file_load_the_same_weights_offline(smoke_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any hub access would fail
    from_folder = load_smoke(smoke_dir)
    from_file = load_smoke(smoke_dir, single_file=True)
    assert len(from_file.tokenizer) == len(from_folder.tokenizer) == 49408
    for name in ("unet", "vae", "text_encoder"):
        folder_state = getattr(from_folder, name).state_dict()
        file_state = getattr(from_file, name).state_dict()
        assert folder_state.keys() == file_state.keys(), name
        for key, tensor in folder_state.items():
            assert torch.equal(tensor, file_state[key]), f"{name}.{key}"


def test_the_pipeline_names_its_device_without_walking_its_modules(smoke_dir):
    """OneDevicePipeline answers _execution_device from the UNet's weights; diffusers' pipeline must still ask for it
    on each call (else the override is dead) and its own answer must agree."""
    pipe = load_smoke(smoke_dir)
    assert isinstance(pipe, OneDevicePipeline)
    assert "self._execution_device" in inspect.getsource(StableDiffusionPipeline.__call__)
    assert isinstance(inspect.getattr_static(StableDiffusionPipeline, "_execution_device"), property)
    assert pipe._execution_device == StableDiffusionPipeline._execution_device.fget(pipe) == torch.device("cpu")
    assert load_smoke(smoke_dir, single_file=True).__class__ is OneDevicePipeline


def test_empty_tokenizer_folder_is_caught(smoke_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(smoke_dir / SMOKE_FOLDER, broken)
    for file in (broken / "tokenizer").iterdir():
        file.unlink()
    with pytest.raises(WeightsError, match="tokenizer"):
        load_base_pipeline(broken, config_dir=broken, dtype=torch.float32)


def test_wrong_paths_are_clear_errors(tmp_path):
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(WeightsError, match="model_index.json is missing"):
        load_base_pipeline(tmp_path / "empty_folder", config_dir=tmp_path, dtype=torch.float32)
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(WeightsError, match="expected a diffusers folder"):
        load_base_pipeline(tmp_path / "model.bin", config_dir=tmp_path, dtype=torch.float32)
    (tmp_path / "garbage.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="could not load SD1.5"):
        load_base_pipeline(tmp_path / "garbage.safetensors", config_dir=tmp_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def pipe(smoke_dir):
    return load_smoke(smoke_dir)


def smoke_lora_with(smoke_dir: Path, path: Path, change) -> Path:
    tensors = load_file(smoke_dir / SMOKE_LORA)
    change(tensors)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    return path


def test_guard_accepts_the_smoke_lora(pipe, smoke_dir):
    check_lora_matches_model(pipe, inspect_lora(smoke_dir / SMOKE_LORA))


def test_guard_refuses_wrong_shapes(pipe, smoke_dir, tmp_path):
    def widen(tensors):
        tensors[f"{ATTENTION}.lora_down.weight"] = torch.zeros(32, 768, dtype=torch.float16)

    path = smoke_lora_with(smoke_dir, tmp_path / "wide.safetensors", widen)
    with pytest.raises(LoraError, match=f"{ATTENTION} is 768->"):
        check_lora_matches_model(pipe, inspect_lora(path))


def test_guard_refuses_partial_match(pipe, smoke_dir, tmp_path):
    def add_foreign(tensors):
        name = "lora_unet_down_blocks_9_attentions_0_proj_in"
        tensors[f"{name}.lora_down.weight"] = torch.zeros(32, 32, dtype=torch.float16)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(32, 32, dtype=torch.float16)

    path = smoke_lora_with(smoke_dir, tmp_path / "partial.safetensors", add_foreign)
    with pytest.raises(LoraError, match="1 of 205 LoRA modules match no layer"):
        check_lora_matches_model(pipe, inspect_lora(path))


def test_fuse_refuses_sdxl_and_empty_files_before_touching_the_model(smoke_dir, tmp_path):
    pipe = load_smoke(smoke_dir)
    sdxl = write_lora(tmp_path / "sdxl.safetensors", sdxl_modules(), rank=128, alpha=64)
    with pytest.raises(LoraError, match="SDXL"):
        fuse_lora(pipe, inspect_sd15_lora(sdxl, expected_rank=32), scale=1.0)
    empty = write_lora(tmp_path / "empty.safetensors", {})
    with pytest.raises(LoraError, match="no tensors"):
        fuse_lora(pipe, inspect_sd15_lora(empty, expected_rank=32), scale=1.0)
    assert count_lora_layers(pipe) == 0


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_fuse_adds_scaled_delta_and_leaves_no_adapter_wrappers(smoke_dir, scale):
    base = load_smoke(smoke_dir)
    fused = load_smoke(smoke_dir)
    info = inspect_sd15_lora(smoke_dir / SMOKE_LORA, expected_rank=32)
    fuse_lora(fused, info, scale=scale)
    assert len(info.modules) == len(kohya_targets(fused))
    assert count_lora_layers(fused) == 0
    lora = load_file(smoke_dir / SMOKE_LORA)
    base_targets, fused_targets = kohya_targets(base), kohya_targets(fused)
    for name in (ATTENTION, PROJ_IN, "lora_te_text_model_encoder_layers_1_mlp_fc2"):
        down = lora[f"{name}.lora_down.weight"].float().flatten(1)
        up = lora[f"{name}.lora_up.weight"].float().flatten(1)
        delta = scale * (float(lora[f"{name}.alpha"]) / down.shape[0]) * (up @ down)
        expected = base_targets[name].weight.detach().flatten(1) + delta
        assert torch.allclose(fused_targets[name].weight.detach().flatten(1), expected, atol=1e-5), name
    sample, timestep, text = torch.randn(1, 4, 8, 8), torch.tensor(10), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert not torch.allclose(base.unet(sample, timestep, text).sample, fused.unet(sample, timestep, text).sample)


def test_every_configured_scheduler_can_be_set(smoke_dir):
    from service.config import SCHEDULERS as NAMES
    from service.loading import SCHEDULERS, set_scheduler

    assert set(SCHEDULERS) == set(NAMES)
    pipe = load_smoke(smoke_dir)
    for name in NAMES:
        set_scheduler(pipe, name)
        assert isinstance(pipe.scheduler, SCHEDULERS[name])
