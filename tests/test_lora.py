"""LoRA inspection and the SD1.5 guard, on synthetic kohya files (no model needed)."""

import pytest

from service.lora.inspect import LoraError, check_sd15_lora, inspect_lora
from tests.lora_files import SD15_CROSS_ATTENTION, sd15_modules, sdxl_modules, write_lora

SD1_METADATA = {"ss_base_model_version": "sd_v1", "ss_network_dim": "32", "ss_network_alpha": "16"}


def test_sd15_rank32_file_is_read_and_accepted(tmp_path):
    info = inspect_lora(write_lora(tmp_path / "ok.safetensors", sd15_modules(), metadata=SD1_METADATA))
    assert info.family == "sd1"
    assert info.ranks == [32] and info.rank == 32 and info.alphas == [16.0]
    assert info.module_counts == {"unet": 1, "te": 1}
    assert info.metadata["ss_network_dim"] == "32"
    assert info.modules[SD15_CROSS_ATTENTION].in_features == 768
    assert check_sd15_lora(info, expected_rank=32) == []
    assert "SD1.5 LoRA, rank 32, alpha 16" in info.describe()


def test_family_from_shapes_wins_over_missing_metadata(tmp_path):
    info = inspect_lora(write_lora(tmp_path / "nometa.safetensors", sd15_modules()))
    assert info.metadata == {} and info.family_from_metadata == "unknown"
    assert info.family == "sd1"


def test_sdxl_lora_is_refused_with_what_it_is_and_what_is_expected(tmp_path):
    path = write_lora(
        tmp_path / "sdxl.safetensors",
        sdxl_modules(),
        rank=128,
        alpha=64,
        metadata={"ss_base_model_version": "sdxl_base_v1-0"},
    )
    info = inspect_lora(path)
    assert info.family == "sdxl"
    assert info.module_counts == {"unet": 1, "te1": 1, "te2": 1}
    with pytest.raises(LoraError) as refused:
        check_sd15_lora(info, expected_rank=32)
    message = str(refused.value)
    assert str(path) in message and "SDXL" in message and "rank 128" in message and "SD1.5" in message


def test_sd2_width_is_refused(tmp_path):
    path = write_lora(tmp_path / "sd2.safetensors", {SD15_CROSS_ATTENTION: (1024, 320)})
    with pytest.raises(LoraError, match="SD2"):
        check_sd15_lora(inspect_lora(path), expected_rank=32)


def test_other_rank_is_accepted_with_a_warning(tmp_path):
    info = inspect_lora(write_lora(tmp_path / "dim64.safetensors", sd15_modules(), rank=64, alpha=32))
    warnings = check_sd15_lora(info, expected_rank=32)
    assert len(warnings) == 1 and "rank 64, expected 32" in warnings[0]


def test_metadata_disagreeing_with_shapes_is_reported(tmp_path):
    info = inspect_lora(
        write_lora(
            tmp_path / "mislabelled.safetensors", sd15_modules(), metadata={"ss_base_model_version": "sdxl_base_v1-0"}
        )
    )
    assert info.family == "sd1"
    assert any("metadata says SDXL" in w for w in check_sd15_lora(info, expected_rank=32))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "too short"),
        (b"this is not a safetensors file at all", "bad header length"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}", "unreadable header"),
    ],
)
def test_non_safetensors_files_are_refused_clearly(tmp_path, content, reason):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoraError, match=reason):
        inspect_lora(path)


def test_empty_and_truncated_files_are_refused(tmp_path):
    empty = write_lora(tmp_path / "empty.safetensors", {})
    with pytest.raises(LoraError, match="no tensors"):
        inspect_lora(empty)
    whole = write_lora(tmp_path / "whole.safetensors", sd15_modules())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(LoraError, match="truncated"):
        inspect_lora(truncated)
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(whole.read_bytes() + b"\0" * 100)  # the same check as `weights check`: exact size
    with pytest.raises(LoraError, match="truncated or padded"):
        inspect_lora(padded)
    with pytest.raises(LoraError, match="not found"):
        inspect_lora(tmp_path / "missing.safetensors")
