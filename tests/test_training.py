"""`punks train` and Cog's `train` (service/training/): bad data refused with the file's name before any model
loads; captions written in the trained format; and a real training of a few steps on 8 generated sprites over the
demo model whose result passes the LoRA guard, loads in the engine and changes what it draws, resumes, and is served
the same way through coglet's /trainings on loopback."""

import base64
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from devtools.demo import DEMO_DIR, DEMO_FOLDER, demo_model_present
from service import cli
from service.config import Settings
from service.lora.inspect import check_sd15_lora, inspect_sd15_lora
from service.pixelart import upscale
from service.training.captions import write_caption
from service.training.data import read_dataset
from tests.hostile_hosts import INTERNAL_HOST, canary
from tests.test_predict import ROOT, CogServer, decode_data_url
from train import sprites

DEMO_BASE = DEMO_DIR / DEMO_FOLDER
needs_demo_model = pytest.mark.skipif(not demo_model_present(), reason="the demo model is not in this checkout")


def sprite_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(sprites.render(sprites.random_punk(rng))) for _ in range(count)]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def run_cli(*argv: str) -> int:
    return cli.main(["train", *map(str, argv)])


# --- data and captions --------------------------------------------------------------------------------


def test_written_captions_follow_the_trained_format_and_given_ones_are_kept(tmp_path: Path):
    first, second = sprite_images(2)
    first.save(tmp_path / "a.png")
    upscale(second, 240, integer_scale=True).save(tmp_path / "b.png")  # 10 px cells: snapped back to 24x24
    (tmp_path / "b.txt").write_text("pixel art, 24x24, portrait of bespoke punk lass,  green background\n")
    a, b = read_dataset(tmp_path, "lad")
    background = "#{:02x}{:02x}{:02x}".format(*np.asarray(first)[0, 0])
    assert a.caption_written and a.caption.startswith("pixel art, 24x24, portrait of bespoke punk lad, ")
    assert f"background ({background}), palette: {background}" in a.caption or f"({background})" in a.caption
    assert a.caption.endswith(", sharp pixel edges, hard color borders, retro pixel art style")
    assert a.caption == write_caption(first, "lad")
    assert not b.caption_written and b.caption == "pixel art, 24x24, portrait of bespoke punk lass, green background"
    assert np.array_equal(np.asarray(b.sprite), np.asarray(second.convert("RGB")))


def bomb(tmp_path: Path) -> Path:
    return write_zip(tmp_path / "bomb.zip", {"a.png": png(sprite_images(1)[0]), "b.png": bytes(8 * 2**20)})


def traversal(tmp_path: Path) -> Path:
    return write_zip(tmp_path / "evil.zip", {"../evil.png": png(sprite_images(1)[0])})


def non_images(tmp_path: Path) -> Path:
    return write_zip(tmp_path / "docs.zip", {"notes.pdf": b"%PDF-1.4"})


def empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def linked(tmp_path: Path) -> Path:
    folder = tmp_path / "linked"
    folder.mkdir()
    sprite_images(1)[0].save(tmp_path / "elsewhere.png")
    os.symlink(tmp_path / "elsewhere.png", folder / "a.png")
    return folder


def folder_with(tmp_path: Path, files: dict[str, bytes]) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def wrong_size(tmp_path: Path) -> Path:
    return folder_with(tmp_path, {"small.png": png(Image.new("RGB", (30, 30), "red"))})


def photo_sprite(tmp_path: Path) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    return folder_with(tmp_path, {"photo.png": png(Image.fromarray(noise))})


def photo_large(tmp_path: Path) -> Path:
    x = np.linspace(0, 255, 256)
    gradient = np.stack([*np.meshgrid(x, x), np.full((256, 256), 128.0)], -1).astype(np.uint8)
    return folder_with(tmp_path, {"photo.png": png(Image.fromarray(gradient))})


def orphan_caption(tmp_path: Path) -> Path:
    return folder_with(tmp_path, {"a.png": png(sprite_images(1)[0]), "b.txt": b"pixel art"})


def not_an_image(tmp_path: Path) -> Path:
    return folder_with(tmp_path, {"a.png": b"not a png at all"})


def sdxl_base(tmp_path: Path) -> Path:
    index = {"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "x"]}
    return config_folder(tmp_path / "sdxl", index, {"cross_attention_dim": 2048, "addition_embed_type": "text_time"})


def sd2_base(tmp_path: Path) -> Path:
    index = {"_class_name": "StableDiffusionPipeline"}
    return config_folder(tmp_path / "sd2", index, {"cross_attention_dim": 1024})


def config_folder(base: Path, index: dict, unet: dict) -> Path:
    """The configs of a diffusers model folder, all the base model check reads."""
    for sub, content in {
        "model_index.json": index,
        "unet/config.json": unet,
        "scheduler/scheduler_config.json": {},
    }.items():
        (base / sub).parent.mkdir(parents=True, exist_ok=True)
        (base / sub).write_text(json.dumps(content))
    return base


BAD_DATA = {
    "zip bomb": (bomb, "b.png: compressed"),
    "path traversal": (traversal, "../evil.png: a member path outside the archive"),
    "no images": (non_images, "notes.pdf: neither an image"),
    "empty": (empty, "no images"),
    "symlink": (linked, "a.png: a link"),
    "wrong size": (wrong_size, "small.png: 30x30 px; expected a 24x24 sprite"),
    "not pixel art (24x24)": (photo_sprite, "photo.png: not pixel art: 5"),
    "not pixel art (larger)": (photo_large, "photo.png: not pixel art on a 24x24 grid"),
    "caption without image": (orphan_caption, "b.txt: a caption without an image"),
    "unreadable image": (not_an_image, "a.png: not a readable image"),
}


@pytest.mark.parametrize("case", BAD_DATA, ids=list(BAD_DATA))
def test_bad_data_is_refused_naming_the_file_before_any_model_loads(case, tmp_path, capsys, monkeypatch):
    make, message = BAD_DATA[case]
    data = make(tmp_path)
    monkeypatch.setattr("service.training.loop.train_lora", _no_training)
    assert run_cli(data, "--out", tmp_path / "out", "--base-model", DEMO_BASE) == 2
    error = capsys.readouterr().err
    assert message in error, error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rank", "64"], "rank: 64 refused: in the training analysis"),
        (["--subject", "a, b"], "subject: 'a, b' must be"),
        (["--epochs", "0"], "epochs: must be at least 1"),
        (["--resolution", "100"], "resolution: must be a multiple of 8"),
        (["--eval-seeds", "-1"], "eval_seeds: -1 is not between 0 and"),
        (["--eval-steps", "0"], "eval_steps: must be between 1 and 100, got 0"),
    ],
)
def test_settings_that_failed_or_make_no_sense_are_refused(argv, message, tmp_path, capsys, monkeypatch):
    folder = folder_with(tmp_path, {"a.png": png(sprite_images(1)[0])})
    monkeypatch.setattr("service.training.loop.train_lora", _no_training)
    assert run_cli(folder, "--base-model", DEMO_BASE, *argv) == 2
    assert message in capsys.readouterr().err


def test_a_base_that_is_not_sd15_is_refused_even_when_forced_for_sdxl(tmp_path, capsys, monkeypatch):
    folder = folder_with(tmp_path, {"a.png": png(sprite_images(1)[0])})
    monkeypatch.setattr("service.training.loop.train_lora", _no_training)
    for extra in ([], ["--force"]):
        assert run_cli(folder, "--base-model", sdxl_base(tmp_path), *extra) == 2
        assert "is an SDXL model; this trainer trains SD1.5 LoRAs" in capsys.readouterr().err


def test_an_sd2_base_is_refused_unless_forced(tmp_path, capsys, monkeypatch):
    folder = folder_with(tmp_path, {"a.png": png(sprite_images(1)[0])})
    monkeypatch.setattr("service.training.loop.train_lora", _no_training)
    assert run_cli(folder, "--base-model", sd2_base(tmp_path)) == 2
    assert "is an SD2.x model, not SD1.5: in the training analysis" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="training started"):  # forced: every check passed
        run_cli(folder, "--base-model", sd2_base(tmp_path), "--force", "--out", tmp_path / "out")


@pytest.mark.parametrize(
    ("first_key", "message"),
    [
        ("conditioner.embedders.1.model.ln_final.weight", "is an SDXL model"),
        ("cond_stage_model.model.ln_final.weight", "is an SD2.x model, not SD1.5"),
    ],
)
def test_a_single_file_base_is_judged_by_its_tensor_names(first_key, message, tmp_path, capsys, monkeypatch):
    import torch

    base = tmp_path / "model.safetensors"
    save_file({first_key: torch.zeros(2), "model.diffusion_model.out.0.weight": torch.zeros(2)}, str(base))
    folder = folder_with(tmp_path, {"a.png": png(sprite_images(1)[0])})
    monkeypatch.setattr("service.training.loop.train_lora", _no_training)
    assert run_cli(folder, "--base-model", base) == 2
    assert message in capsys.readouterr().err


def _no_training(*args, **kwargs):
    raise AssertionError("training started on refused input")


# --- a real training ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """8 generated sprites in a zip, 2 epochs of batch 4 at 128 px over the demo model (the engine draws at 512)."""
    folder = tmp_path_factory.mktemp("train")
    data = write_zip(folder / "punks.zip", {f"punks/p{i}.png": png(s) for i, s in enumerate(sprite_images(8))})
    prompts = folder / "prompts.txt"
    prompts.write_text("lad, green background (#4e8f3a)\n")
    out = folder / "out"
    argv = ["--out", out, "--base-model", DEMO_BASE, "--batch-size", 4, "--resolution", 128, "--learning-rate", 1e-3]
    argv += ["--eval-prompts", prompts, "--eval-steps", 2, "--seed", 3]
    assert run_cli(data, *argv, "--epochs", 2) == 0
    first_run = {p.name: p.read_bytes() for p in (out / "checkpoints").glob("*.safetensors")}
    assert run_cli(data, *argv, "--epochs", 3) == 0  # resumes after epoch 2
    return out, first_run


@needs_demo_model
def test_training_writes_every_epoch_the_ranking_and_the_best_one(trained):
    out, first_run = trained
    summary = json.loads((out / "training.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [3]  # the second run trained only what was left
    assert sorted(p.name for p in (out / "checkpoints").glob("*.safetensors")) == [
        f"bespoke_punks-00000{epoch}.safetensors" for epoch in (1, 2, 3)
    ]
    for name, data in first_run.items():  # resuming kept the finished epochs as they were
        assert (out / "checkpoints" / name).read_bytes() == data
    ranking = summary["ranking"]
    assert len(ranking) == 3 and ranking[0]["score"] >= ranking[-1]["score"]
    best = out / "checkpoints" / f"bespoke_punks-{summary['best_epoch']:06d}.safetensors"
    assert (out / "bespoke_punks.safetensors").read_bytes() == best.read_bytes()
    assert ranking[0]["name"] == best.stem
    assert Image.open(out / "evaluation" / "contact_sheet.png").height > 3 * 144
    assert "| 1 |" in (out / "evaluation" / "ranking.md").read_text()
    assert sorted(p.name for p in (out / "captions" / "punks").iterdir()) == [f"p{i}.txt" for i in range(8)]


@needs_demo_model
def test_the_trained_lora_passes_the_guard_and_changes_what_the_engine_draws(trained, tmp_path):
    from service.engine import Engine, GenerationRequest

    out = trained[0]
    lora = out / "bespoke_punks.safetensors"
    info = inspect_sd15_lora(lora, 32)
    assert check_sd15_lora(info, 32) == [] and info.format == "kohya" and info.ranks == [32] and info.alphas == [16]
    assert info.module_counts["unet"] > 0 and info.module_counts["te"] > 0
    with safe_open(lora, "pt") as file:
        metadata = file.metadata()
    assert metadata["ss_network_dim"] == "32" and metadata["ss_network_alpha"] == "16"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_num_train_images"] == "8"
    tensors = load_file(lora)
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))
    untrained = tmp_path / "untrained.safetensors"  # the same file, up weights zero: the base model's output
    zeroed = {k: v.zero_() if k.endswith("lora_up.weight") else v for k, v in tensors.items()}
    save_file(zeroed, str(untrained), metadata=metadata)
    settings = Settings(base_model=DEMO_BASE, lora=lora, device="cpu", steps=2, warmup=False, snap_processes=0)
    engine = Engine.load(settings, loras={"untrained": untrained})
    request = {"prompt": "lad, green background", "seed": 5}
    trained_image = engine.generate(GenerationRequest(**request)).images[0].raw
    base_image = engine.generate(GenerationRequest(**request, lora="untrained")).images[0].raw
    difference = np.abs(np.asarray(trained_image, float) - np.asarray(base_image, float)).mean()
    assert difference > 1.0, difference


# --- Cog trainings through coglet -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cog_trainer(smoke_env, tmp_path_factory):
    env = smoke_env | {
        "COG_TRAIN_TYPE_STUB": "trainer.py:train",
        "PUNKS_BASE_MODEL": str(DEMO_BASE),
        "PUNKS_LORA": str(DEMO_DIR / "bespoke_punks.safetensors"),
    }
    logs = tmp_path_factory.mktemp("cog-train")
    server = CogServer("train", env, ROOT, logs, args=("--x-mode", "train"), concurrency=1)
    health = server.wait_until_settled()
    assert health["status"] == "READY", health
    yield server
    server.stop()


def zip_url(path: Path) -> str:
    return "data:application/zip;base64," + base64.b64encode(path.read_bytes()).decode()


@needs_demo_model
def test_cog_training_refuses_bad_data_naming_the_member(cog_trainer, tmp_path):
    status, body = cog_trainer.request("POST", "/trainings", {"input": {"input_images": zip_url(traversal(tmp_path))}})
    assert status == 200 and body["status"] == "failed", body
    assert "../evil.png: a member path outside the archive" in body["error"]
    status, body = cog_trainer.request("POST", "/trainings", {"input": {"input_images": "x", "rank": 0}})
    assert status == 422 and body["detail"][0]["loc"][-1] == "rank", body


@needs_demo_model
def test_cog_training_fetches_input_images_under_the_download_policy(cog_trainer):
    """A URL to an internal host is refused naming input_images, before any connection is made to it."""
    with canary() as internal:
        url = f"https://{INTERNAL_HOST}:{internal.port}/punks.zip"
        status, body = cog_trainer.request("POST", "/trainings", {"input": {"input_images": url}})
        assert status == 200 and body["status"] == "failed", body
        assert f"input_images: {INTERNAL_HOST}: refused, not a public address (loopback)" in body["error"], body
        assert internal.hits == 0


@needs_demo_model
def test_cog_training_returns_the_lora_the_inference_model_takes(cog_trainer, tmp_path):
    data = write_zip(tmp_path / "punks.zip", {f"p{i}.png": png(s) for i, s in enumerate(sprite_images(8))})
    inputs = {"input_images": zip_url(data), "epochs": 1, "batch_size": 8, "eval_steps": 1}
    status, body = cog_trainer.request("POST", "/trainings", {"input": inputs}, timeout=600)
    assert status == 200 and body["status"] == "succeeded", body.get("error") or body.get("logs", "")[-3000:]
    assert "epoch 1/1  step 1/1  loss" in body["logs"] and "best epoch 1 of 1" in body["logs"]
    _, weights = decode_data_url(body["output"]["weights"])
    lora = tmp_path / "trained.safetensors"
    lora.write_bytes(weights)
    assert check_sd15_lora(inspect_sd15_lora(lora, 32), 32) == []
    _, captions = decode_data_url(body["output"]["captions"])
    assert len(zipfile.ZipFile(io.BytesIO(captions)).namelist()) == 8
    assert decode_data_url(body["output"]["contact_sheet"])[0] == "image/png"


def test_the_bench_projects_the_seed_run_from_steps_per_second():
    from bench.train_gpu import projection

    projected = projection({1: 2.0, 4: 1.0}, eval_s_per_epoch=30.0)
    assert projected[1] == {"steps": 2030, "training_s": 1015, "evaluation_s": 300, "total_min": 21.9}
    assert projected[4]["steps"] == 510 and projected[4]["total_min"] == round((510 + 300) / 60, 1)
