"""GPU speed-up helpers that run anywhere: batch buckets and the portable compile cache file."""

import logging

import pytest
import torch

from service.acceleration import _fp8_target, bucket_size, load_compile_artifacts
from service.cli import main


@pytest.mark.parametrize("images, bucket", [(1, 1), (3, 4), (4, 4), (5, 5)])
def test_a_batch_is_padded_to_the_smallest_bucket_that_holds_it(images, bucket):
    assert bucket_size(images, (1, 2, 4)) == bucket


def test_a_foreign_compile_cache_is_ignored_with_a_warning(tmp_path, caplog):
    foreign = tmp_path / "torch-compile-artifacts.bin"
    foreign.write_bytes(b"made by another torch")
    with caplog.at_level(logging.INFO, logger="service.acceleration"):
        load_compile_artifacts(foreign)  # only a cache: a start must not fail on it
        load_compile_artifacts(tmp_path / "absent.bin")  # none made yet: nothing to say
    ours = [record for record in caplog.records if record.name == "service.acceleration"]
    assert [record.levelname for record in ours] == ["WARNING"]
    assert f"ignoring the compile cache {foreign}" in caplog.text and "compiling from scratch" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_compile_cache_command_needs_a_gpu(capsys):
    assert main(["compile-cache"]) == 2
    assert "compile-cache: needs a CUDA GPU" in capsys.readouterr().err


def test_fp8_is_refused_at_start_where_it_cannot_run(smoke_env, monkeypatch, capsys, tmp_path):
    for name, value in smoke_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PUNKS_FP8", "true")
    monkeypatch.setenv("PUNKS_DEVICE", "cpu")
    assert main(["generate", "lad with a red beanie", "--seed", "1", "-o", str(tmp_path / "punk.png")]) == 2
    assert "fp8: PUNKS_FP8 needs a CUDA GPU of compute capability 8.9+ (device is 'cpu')" in capsys.readouterr().err


def test_fp8_swaps_only_the_transformer_blocks_linear_layers(engine):
    chosen = [name for name, module in engine.pipe.unet.named_modules() if _fp8_target(module, name)]
    assert chosen, "the smoke UNet's attention and feed-forward layers are FP8 targets"
    assert all(".transformer_blocks." in name for name in chosen)
    assert {name.rsplit(".", 1)[-1] for name in chosen} >= {"to_q", "to_k", "to_v"}
    assert not any("time_embedding" in name or "conv" in name for name in chosen)
