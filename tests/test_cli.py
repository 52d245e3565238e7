"""End to end: `python -m service generate` in a subprocess, as a user runs it."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image


def run_cli(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_generate_writes_png_sprite_and_json(smoke_env, tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = smoke_env | {"PYTHONPATH": str(repo)}
    output = tmp_path / "out" / "punk.png"
    done = run_cli(
        [
            "generate",
            "lad with a red beanie, green background",
            "--seed",
            "7",
            "--sampler",
            "k_euler_a",
            "-o",
            str(output),
        ],
        env,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "SMOKE" in done.stderr  # the fallback is loud
    image = np.asarray(Image.open(output).convert("RGB"))
    assert image.shape == (1024, 1024, 3)
    sprite = np.asarray(Image.open(output.with_suffix(".sprite.png")).convert("RGB"))
    assert sprite.shape == (24, 24, 3)
    edges = np.round(np.arange(25) * 1024 / 24).astype(int)
    for row in range(24):
        for column in range(24):
            cell = image[edges[row] : edges[row + 1], edges[column] : edges[column + 1]].reshape(-1, 3)
            assert (cell == sprite[row, column]).all(), (row, column)
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert metadata["images"][0]["seed"] == 7 and metadata["sampler"] == "Euler a"
    assert metadata["prompt"].startswith("pixel art, 24x24, portrait of bespoke punk lad with a red beanie")
    palette = {"#{:02x}{:02x}{:02x}".format(*c) for c in sprite.reshape(-1, 3)}
    assert set(metadata["images"][0]["palette"]) == palette
    assert set(metadata["images"][0]["quality"]) >= {"grid_fit", "palette_size", "is_pixel_art"}


def test_bad_input_gives_a_message_and_nonzero_exit(smoke_env, tmp_path):
    from pathlib import Path

    env = smoke_env | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    empty = run_cli(["generate", "  "], env, tmp_path)
    assert empty.returncode == 2 and "prompt: must not be empty" in empty.stderr
    steps = run_cli(["generate", "lad", "--num-inference-steps", "500"], env, tmp_path)
    assert steps.returncode == 2 and "num_inference_steps: must be between" in steps.stderr
    sampler = run_cli(["generate", "lad", "--sampler", "DPM fast"], env, tmp_path)
    assert sampler.returncode == 2 and "sampler: unknown sampler 'DPM fast'; accepted: Euler, Euler a" in sampler.stderr
    not_a_number = run_cli(["generate", "lad", "--seed", "abc"], env, tmp_path)
    assert not_a_number.returncode == 2 and "invalid int value" in not_a_number.stderr


def test_missing_weights_without_fallback_fail_at_startup(smoke_env, tmp_path):
    from pathlib import Path

    env = smoke_env | {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PUNKS_ALLOW_SMOKE_MODEL": "false"}
    done = run_cli(["generate", "lad"], env, tmp_path)
    assert done.returncode == 1
    assert "bespoke_punks.safetensors" in done.stderr and "weights download" in done.stderr


def test_a_variation_with_a_palette_and_a_transparent_background(smoke_env, tmp_path):
    from pathlib import Path

    from service.sprite_controls import PRESETS, rgb_codes
    from train import sprites

    env = smoke_env | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = tmp_path / "start.png"
    Image.fromarray(sprites.render(sprites.random_punk(np.random.default_rng(1)))).save(start)
    output = tmp_path / "vary.png"
    arguments = ["generate", "lad", "--seed", "3", "--image", str(start), "--strength", "0.5", "-o", str(output)]
    done = run_cli([*arguments, "--palette", "game-boy", "--background", "transparent"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    image = np.asarray(Image.open(output).convert("RGBA"))
    sprite = np.asarray(Image.open(output.with_suffix(".sprite.png")).convert("RGBA"))
    summary = json.loads(output.with_suffix(".json").read_text())["images"][0]
    mask = np.array([[cell == "1" for cell in row] for row in summary["background_mask"]])
    assert np.array_equal(sprite[..., 3] == 0, mask) and summary["background_cells"] == int(mask.sum())
    palette = {tuple(colour) for colour in rgb_codes(PRESETS["game-boy"]).tolist()}
    assert {tuple(pixel) for pixel in image[..., :3][image[..., 3] == 255].tolist()} <= palette


def test_bad_controls_give_a_message_naming_the_field_and_exit_2(smoke_env, tmp_path):
    from pathlib import Path

    env = smoke_env | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is no image")
    for arguments, message in [
        (["--palette", "#12345"], "palette: colour 1 is not a '#rrggbb' code"),
        (["--palette", "gameboy"], "palette: unknown preset"),
        (["--background", "clear"], "background: must be 'keep', 'transparent' or a '#rrggbb' colour"),
        (["--image", str(junk)], "image: is not a complete image file"),
        (["--image", str(tmp_path / "missing.png")], "image: must be an image file of at most"),
        (["--strength", "0.5"], "strength: applies to a variation"),
    ]:
        done = run_cli(["generate", "lad", *arguments], env, tmp_path)
        assert done.returncode == 2 and f"error: {message}" in done.stderr, (arguments, done.stderr)
        assert "this is no image" not in done.stderr


def test_an_unreadable_image_or_unwritable_output_is_a_message_before_the_model_loads(smoke_env, tmp_path):
    from pathlib import Path

    env = smoke_env | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    not_a_folder = tmp_path / "file"
    not_a_folder.write_bytes(b"")
    for arguments, message in [
        (["--image", "/proc/self/mem"], "error: image: could not be read (Input/output error)"),  # a file read fails
        (["-o", str(not_a_folder / "out.png")], f"error: output: cannot create the folder {not_a_folder}"),
        (["-o", ""], "error: output: must name a file"),
    ]:
        done = run_cli(["generate", "lad", *arguments], env, tmp_path)
        assert done.returncode == 2 and message in done.stderr, (arguments, done.stderr)
        assert "Traceback" not in done.stderr and "SMOKE" not in done.stderr  # refused before the model loads
