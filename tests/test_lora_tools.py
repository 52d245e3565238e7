"""LoRA tooling: `lora inspect`, `lora diff`, `evaluate`, and serving several LoRAs (switching)."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from devtools.random_lora import kohya_metadata
from service.lora import report as lora_report
from service.lora.evaluate import TILE, background_adherence, background_colour, image_score, load_prompts, tile_box
from service.lora.inspect import LoraError, check_sd15_lora, inspect_lora
from service.lora.layout import sd15_lora_bytes, sd15_modules
from service.pixelart import QualitySignals
from tests.lora_files import sd15_full_modules, sdxl_full_unet_sample, write_locon, write_lora
from tests.lora_files import sd15_modules as small_sd15

REPO = Path(__file__).resolve().parents[1]
TAGS = {"pixel art": 203, "24x24": 203, "portrait of bespoke punk lad": 120, "sharp pixel edges": 203}
log = logging.getLogger(__name__)


def run_meta(rank: int, alpha: float, version: str, folder: str, tags: dict | None = None, **extra) -> dict[str, str]:
    """kohya metadata of one run; the captions live in `folder` (the runs copied them to different folders)."""
    return kohya_metadata(
        rank,
        alpha,
        version,
        ss_tag_frequency=json.dumps({folder: tags or TAGS}),
        ss_dataset_dirs=json.dumps({folder: {"n_repeats": 10, "img_count": 203}}),
        ss_learning_rate="0.0001",
        ss_session_id=str(rank),
        **extra,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The training analysis's three runs: same captions, dim 32 / 64 (SD1.5) and dim 128 (SDXL)."""
    folder = tmp_path_factory.mktemp("runs")
    return {
        "dim32": write_lora(
            folder / "bespoke_punks_SD15_PERFECT.safetensors",
            sd15_full_modules(),
            32,
            16,
            run_meta(32, 16, "sd_v1", "10_civitai_v2_7_training"),
        ),
        "dim64": write_lora(
            folder / "bespoke_baby_sd15-000009.safetensors",
            sd15_full_modules(),
            64,
            32,
            run_meta(64, 32, "sd_v1", "10_sd15_training_512", ss_epoch="9"),
        ),
        "dim128": write_lora(
            folder / "bespoke_baby_sdxl-000004.safetensors",
            sdxl_full_unet_sample(),
            128,
            64,
            run_meta(128, 64, "sdxl_base_v1-0", "10_training_data", ss_resolution="(1024, 1024)"),
        ),
    }


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = (env or {}) | {"PYTHONPATH": str(REPO)}
    import os

    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=os.environ | env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- the SD1.5 layout and the expected size ----------------------------------------------------------


def test_sd15_layout_is_kohyas_module_list_of_the_real_sd15():
    """The torch-free list equals what kohya wraps in SD1.5 built from the shipped configs (on the meta device)."""
    from types import SimpleNamespace

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from service.config import SD15_CONFIG_DIR
    from service.lora.fuse import kohya_targets

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((SD15_CONFIG_DIR / "unet" / "config.json").read_text()))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder"))
    targets = kohya_targets(SimpleNamespace(unet=unet, text_encoder=text_encoder))
    assert {name: (m.weight.shape[1], m.weight.shape[0]) for name, m in targets.items()} == sd15_modules()
    assert (
        sum(n.startswith("lora_unet_") for n in targets) == 192 and sum(n.startswith("lora_te_") for n in targets) == 72
    )
    assert round(sd15_lora_bytes(32) / 2**20) == 36 and round(sd15_lora_bytes(64) / 2**20) == 72


# --- inspect -----------------------------------------------------------------------------------------


def test_inspect_dim32_sd15_run(runs):
    data = lora_report.report(inspect_lora(runs["dim32"]))
    assert data["base_model"] == {"family": "SD1.5", "from_keys": "SD1.5", "from_metadata": "SD1.5", "agree": True}
    assert data["rank"] == {"values": {"32": 264}, "varies": False}
    assert data["alpha"]["values"] == {"16": 264} and data["scale"]["values"] == {"0.5": 264}
    assert data["modules"] == {"total": 264, "unet": 192, "te": 72} and data["conv_modules"] == []
    assert data["dtypes"] == ["F16"]
    expected = data["expected"]
    assert expected["covered"] == 264 and expected["missing"] == 0 and expected["ratio"] == 1.0
    assert data["file_size"] > expected["bytes"] > 0.99 * data["file_size"]  # header and metadata are small
    training = data["training"]
    assert training["epoch"] == "7" and training["learning rate"] == "0.0001" and training["resolution"] == "(512, 512)"
    assert training["unet lr"] == "unknown" and training["optimizer"] == "unknown"  # not in the file: not invented
    assert data["dataset"]["images"] == 203 and data["dataset"]["tag_frequency"]["distinct_tags"] == 4
    text = lora_report.format_report(data)
    assert "SD1.5 (keys and metadata agree)" in text and "UNet 192" in text and "text encoder 72" in text


def test_inspect_dim64_is_twice_the_expected_size(runs):
    data = lora_report.report(inspect_lora(runs["dim64"]))
    assert data["rank"]["values"] == {"64": 264} and data["expected"]["ratio"] == 2.0


def test_inspect_sdxl_dim128(runs):
    info = inspect_lora(runs["dim128"])
    data = lora_report.report(info)
    assert data["base_model"]["family"] == "SDXL" and data["base_model"]["agree"] is True
    assert data["modules"] == {"total": 7, "unet": 3, "te1": 2, "te2": 2}
    assert data["training"]["resolution"] == "(1024, 1024)" and "covered" not in data["expected"]


def test_inspect_locon_counts_conv_layers_and_varying_ranks(tmp_path):
    data = lora_report.report(inspect_lora(write_locon(tmp_path / "locon.safetensors", rank=32, conv_rank=8)))
    assert data["conv_modules"] == ["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert data["rank"] == {"values": {"32": 264, "8": 1}, "varies": True}
    assert data["scale"]["varies"] is True and data["expected"]["extra"] == 1
    assert "varies: 32 x264, 8 x1" in lora_report.format_report(data)


def test_inspect_without_metadata_says_unknown(tmp_path):
    data = lora_report.report(inspect_lora(write_lora(tmp_path / "bare.safetensors", small_sd15())))
    assert data["base_model"]["family"] == "SD1.5" and data["base_model"]["from_metadata"] == "unknown"
    assert set(data["training"].values()) == {"unknown"}
    assert data["dataset"] == {"dirs": None, "images": None, "tag_frequency": None}
    assert "metadata: unknown" in lora_report.format_report(data)


def test_diffusers_and_peft_layouts_are_read_but_not_served(tmp_path):
    peft = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": np.zeros(
            (16, 768), np.float32
        ),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": np.zeros(
            (320, 16), np.float32
        ),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora.down.weight": np.zeros((16, 768), np.float32),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora.up.weight": np.zeros((3072, 16), np.float32),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.alpha": np.array(8.0, np.float32),
    }
    path = tmp_path / "peft.safetensors"
    save_file(peft, str(path))
    info = inspect_lora(path)
    assert info.family == "sd1" and info.format == "diffusers+peft" and info.module_counts == {"unet": 1, "te": 1}
    data = lora_report.report(info)
    assert data["alpha"]["values"] == {"8": 1, "unknown": 1} and data["scale"]["values"] == {"0.5": 1, "unknown": 1}
    with pytest.raises(LoraError, match="kohya"):
        check_sd15_lora(info, expected_rank=32)


def test_bf16_alpha_is_read_without_torch(tmp_path):
    import torch
    from safetensors.torch import save_file as save_torch

    save_torch(
        {
            "lora_te_x.lora_down.weight": torch.zeros(4, 768, dtype=torch.bfloat16),
            "lora_te_x.lora_up.weight": torch.zeros(768, 4, dtype=torch.bfloat16),
            "lora_te_x.alpha": torch.tensor(2.5, dtype=torch.bfloat16),
        },
        str(tmp_path / "bf16.safetensors"),
    )
    assert inspect_lora(tmp_path / "bf16.safetensors").modules["lora_te_x"].alpha == 2.5


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """The CLI in-process (same main() as `python -m service`, without paying torch's import again)."""
    from service.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_inspect_human_and_json(runs, capsys):
    human = run_cli(["lora", "inspect", str(runs["dim32"])])  # once as a user runs it
    assert human.returncode == 0, human.stderr
    assert "rank" in human.stdout and "36.0 MiB" in human.stdout and "Traceback" not in human.stderr
    code, out, _ = cli(["lora", "inspect", str(runs["dim128"]), "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["base_model"]["family"] == "SDXL" and data["rank"]["values"] == {"128": 7}


def test_cli_refuses_a_truncated_file_without_traceback(tmp_path, runs):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(runs["dim128"].read_bytes()[:-1000])
    done = run_cli(["lora", "inspect", str(path)])
    assert done.returncode == 1 and "truncated" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        (b"PK\x03\x04 this is a zip, not safetensors", "not a safetensors file"),
        (len(b'{"a": 5}').to_bytes(8, "little") + b'{"a": 5}', "malformed header"),
        (None, "not found"),
    ],
    ids=["not-safetensors", "malformed-header", "missing"],
)
def test_cli_refuses_broken_files_cleanly(tmp_path, capsys, content, message):
    path = tmp_path / "broken.safetensors"
    if content is not None:
        path.write_bytes(content)
    code, _, err = cli(["lora", "inspect", str(path)], capsys)
    assert code == 1 and message in err


# --- diff --------------------------------------------------------------------------------------------


def test_diff_of_the_three_runs(runs):
    data = lora_report.diff([runs["dim32"], runs["dim64"], runs["dim128"]])
    rows = {row["parameter"]: row["values"] for row in data["parameters"]}
    assert rows["rank"] == ["32", "64", "128"] and rows["base model"] == ["SD1.5", "SD1.5", "SDXL"]
    assert rows["resolution"] == ["(512, 512)", "(512, 512)", "(1024, 1024)"]
    assert "learning rate" not in rows  # equal everywhere: only shown with show_all
    assert data["training_data"] == {"captions": "same", "dataset_dirs": "different", "images": "same"}
    text = lora_report.format_diff(data)
    assert "summary: same captions, dim 32 vs 64 vs 128, SD1.5 vs SD1.5 vs SDXL" in text


def test_diff_with_different_and_missing_captions(tmp_path, runs, capsys):
    other = write_lora(
        tmp_path / "recaptioned.safetensors",
        small_sd15(),
        metadata=run_meta(32, 16, "sd_v1", "10_civitai_v2_7_training", tags=TAGS | {"pixel art": 150}),
    )
    bare = write_lora(tmp_path / "bare.safetensors", small_sd15())
    assert lora_report.diff([runs["dim32"], other])["training_data"]["captions"] == "different"
    assert lora_report.diff([runs["dim32"], bare])["training_data"] == {
        "captions": "unknown",
        "dataset_dirs": "unknown",
        "images": "unknown",
    }
    assert lora_report.diff([runs["dim32"], other, bare])["training_data"]["captions"] == "different"
    done = run_cli(["lora", "diff", str(runs["dim32"]), str(other), "--json"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["training_data"]["captions"] == "different"
    code, out, _ = cli(["lora", "diff", str(runs["dim32"]), str(runs["dim64"]), str(runs["dim128"])], capsys)
    assert code == 0 and "summary: same captions, dim 32 vs 64 vs 128, SD1.5 vs SD1.5 vs SDXL" in out
    code, _, err = cli(["lora", "diff", str(runs["dim32"])], capsys)
    assert code == 2 and "at least two" in err


# --- evaluation signals ------------------------------------------------------------------------------


def test_background_colour_is_read_from_the_prompt():
    assert background_colour("lad with a red beanie, green background") == (60, 160, 60)
    assert background_colour("checkered brick background (#c06148), grey shirt") == (0xC0, 0x61, 0x48)
    assert background_colour("lass, light-blue background") == (50, 100, 210)
    assert background_colour("lad with a red beanie") is None and background_colour("plain background") is None


def test_background_adherence_counts_matching_border_cells():
    sprite = np.zeros((24, 24, 3), np.uint8)
    sprite[:] = (70, 150, 60)  # green everywhere
    sprite[0, :12] = (200, 40, 40)  # half the top row red
    image = Image.fromarray(sprite)
    border = 24 + 2 * 22
    assert background_adherence(image, (60, 160, 60)) == pytest.approx((border - 12) / border)
    assert background_adherence(image, (210, 40, 40)) == pytest.approx(12 / border)
    assert background_adherence(Image.new("RGB", (24, 24), (250, 250, 250)), (255, 255, 255)) == 1.0
    assert background_adherence(Image.new("RGB", (24, 24), (250, 250, 250)), (0, 0, 0)) == 0.0


def test_image_score_prefers_pixel_art_and_rescales_without_background():
    good = QualitySignals(grid_fit=0.95, palette_size=8, is_pixel_art=True, edge_alignment=0.8)
    bad = QualitySignals(grid_fit=0.6, palette_size=120, is_pixel_art=False, edge_alignment=0.3)
    assert image_score(good, 1.0) > image_score(good, None) > image_score(bad, None) > image_score(bad, 0.0)
    assert image_score(QualitySignals(1.0, 4, True, 1.0), None) == pytest.approx(1.0)


def test_shipped_prompts_are_in_caption_style():
    prompts = load_prompts()
    assert 6 <= len(prompts) <= 10
    assert all(background_colour(p) is not None and "palette: #" in p for p in prompts)


# --- evaluate end to end (smoke model) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def other_lora(tmp_path_factory) -> Path:
    """A second random checkpoint for the smoke model (another seed): images visibly differ."""
    from safetensors.torch import save_file as save_torch

    from devtools.random_lora import random_kohya_lora
    from devtools.smoke import build_smoke_pipeline

    path = tmp_path_factory.mktemp("loras") / "other.safetensors"
    save_torch(
        random_kohya_lora(build_smoke_pipeline(), seed=1), str(path), metadata=kohya_metadata(32, 16, ss_epoch="9")
    )
    return path


def test_evaluate_two_checkpoints_writes_sheet_and_ranking(smoke_env, smoke_dir, other_lora, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\nlad, green background (#4e8f3a)\nlass with a red beanie, pink background\n")
    out = tmp_path / "eval"
    checkpoints = [smoke_dir / "bespoke_punks.safetensors", other_lora]
    done = run_cli(
        [
            "evaluate",
            "--loras",
            *map(str, checkpoints),
            "--prompts",
            str(prompts),
            "--seeds",
            "3",
            "--steps",
            "1",
            "--out",
            str(out),
        ],
        smoke_env | {"PUNKS_WARMUP": "false"},
    )
    assert done.returncode == 0, done.stderr
    assert "evaluating" in done.stderr and "SMOKE" in done.stderr  # tqdm bar, and the loud smoke warning
    ranking = json.loads((out / "ranking.json").read_text())
    rows = ranking["ranking"]
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["score"] >= rows[1]["score"]
    assert {r["name"] for r in rows} == {"bespoke_punks", "other"} and all(r["images"] == 2 for r in rows)
    markdown = (out / "ranking.md").read_text()
    assert markdown.startswith("| rank | checkpoint |")
    named = re.findall(r"\bservice/[\w/]+\.py", markdown)  # where the score is explained: a file that exists
    assert named and all((Path(__file__).parent.parent / path).is_file() for path in named)
    sheet = Image.open(out / "contact_sheet.png")
    columns = 2  # 2 prompts x 1 seed
    assert sheet.size == (tile_box(1, columns - 1)[2] + 6, tile_box(1, columns - 1)[3] + 6)
    pixels = np.asarray(sheet.convert("RGB"))
    for row, name in enumerate(["bespoke_punks", "other"]):  # rows in the given order
        for column, (prompt, seed) in enumerate([(1, 3), (2, 3)]):
            sprite = Image.open(out / "sprites" / name / f"p{prompt}-s{seed}.png").convert("RGB")
            left, top, right, bottom = tile_box(row, column)
            tile = pixels[top:bottom, left:right]
            assert tile.shape == (TILE, TILE, 3)
            assert np.array_equal(tile, np.asarray(sprite.resize((TILE, TILE), Image.Resampling.NEAREST)))
    first = np.asarray(Image.open(out / "sprites" / "bespoke_punks" / "p1-s3.png"))
    assert not np.array_equal(first, np.asarray(Image.open(out / "sprites" / "other" / "p1-s3.png")))


# --- serving several LoRAs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def switching_engine(smoke_settings, other_lora):
    from service.engine import Engine

    settings = smoke_settings.model_copy(update={"loras_dir": other_lora.parent, "warmup": False})
    return Engine.load(settings)


PROMPT = "lad with a red beanie, green background"
_images: dict = {}  # (lora, how) -> raw image, shared by the switching tests (each generation costs seconds on CPU)


def raw(engine, lora: str | None = None) -> np.ndarray:
    from service.engine import GenerationRequest

    result = engine.generate(GenerationRequest(PROMPT, seed=5, num_inference_steps=1, lora=lora))
    return np.asarray(result.images[0].raw, dtype=np.int16)


def switch_seconds(engine, lora: str | None) -> float:
    """Generate once with `lora`: the seconds its switch took (0 when it was the active one already)."""
    from service.engine import GenerationRequest

    return engine.generate(GenerationRequest(PROMPT, seed=5, num_inference_steps=1, lora=lora)).timings.get(
        "lora_switch_s", 0.0
    )


def test_switching_lora_changes_the_image_and_back_restores_it(switching_engine):
    engine = switching_engine
    assert engine.lora_names == ["other"]
    default = _images[None] = raw(engine)
    other = _images["other"] = raw(engine, lora="other")
    assert engine.loras.active is not None and engine.loras.active.name == "other.safetensors"
    assert np.abs(default - other).max() > 10
    assert np.array_equal(raw(engine), default)  # restored base weights + the same fuse: bit for bit


def test_mixed_batch_is_grouped_by_lora(switching_engine, monkeypatch):
    from service.engine import GenerationRequest

    engine = switching_engine
    raw(engine, "other")  # "other" is the active LoRA now
    calls: list[tuple[str, int]] = []  # (the LoRA fused at each pipeline call, its batch size)

    pipeline_class = type(engine.pipe)
    original = pipeline_class.__call__

    def counting(self, **kwargs):  # on the class: the engine calls a per-call copy of its pipeline
        calls.append((engine.loras.active.stem, len(kwargs["prompt_embeds"])))
        return original(self, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", counting)
    requests = [GenerationRequest(PROMPT, seed=5, num_inference_steps=1, lora=lora) for lora in (None, "other", None)]
    results = engine.generate_batch(requests)
    # one pipeline call per LoRA, the active one first: one switch
    assert calls == [("other", 1), (engine.weights.lora.stem, 2)]
    assert "lora_switch_s" in results[0].timings
    for result, lora in zip(results, [None, "other", None], strict=True):
        assert np.abs(np.asarray(result.images[0].raw, dtype=np.int16) - _images[lora]).max() <= 2  # batched GEMMs


def test_lora_scale_is_per_request_grouped_and_exact_when_switched_back(switching_engine, monkeypatch):
    """A request's lora_scale re-fuses the LoRA at that scale (from the kept base weights); a batch of mixed scales
    is one pipeline call per scale, and the start-up scale again gives the same bytes as before."""
    from service.engine import GenerationRequest

    engine = switching_engine
    default = raw(engine)
    calls: list[float] = []  # the scale fused at each pipeline call
    pipeline_class = type(engine.pipe)
    original = pipeline_class.__call__

    def counting(self, **kwargs):
        calls.append(engine.loras.active_scale)
        return original(self, **kwargs)

    monkeypatch.setattr(pipeline_class, "__call__", counting)
    scales = (0.0, None, 0.0)
    requests = [GenerationRequest(PROMPT, seed=5, num_inference_steps=1, lora_scale=scale) for scale in scales]
    weak, plain, weak_again = engine.generate_batch(requests)
    assert sorted(calls) == [0.0, 1.0]  # two calls: scale 0 (two requests) and the default scale
    weak_pixels = np.asarray(weak.images[0].raw, dtype=np.int16)
    assert np.abs(weak_pixels - default).max() > 10  # the LoRA at scale 0 draws something else
    assert np.abs(np.asarray(plain.images[0].raw, dtype=np.int16) - default).max() <= 2  # batched GEMMs
    assert np.array_equal(weak_pixels, np.asarray(weak_again.images[0].raw, dtype=np.int16))
    assert np.array_equal(raw(engine), default)


def test_lora_scale_is_refused_where_the_lora_is_fused_once(engine):
    from service.engine import GenerationRequest
    from service.errors import RequestError

    engine.check_request(GenerationRequest(PROMPT, lora_scale=engine.settings.lora_scale))  # the fused one: fine
    with pytest.raises(RequestError, match="^lora_scale: this deployment fuses its LoRA once, at 1 ") as raised:
        engine.check_request(GenerationRequest(PROMPT, lora_scale=0.5))
    assert raised.value.field == "lora_scale"


@pytest.mark.parametrize("name", ["nope", "../loras/other", "other.safetensors", str(Path("/etc/passwd")), " "])
def test_unknown_lora_names_are_refused_naming_the_field(switching_engine, name):
    from service.engine import GenerationRequest

    with pytest.raises(ValueError, match="^lora:") as refused:
        switching_engine.generate(GenerationRequest(PROMPT, seed=1, lora=name))
    if name.strip():
        assert str(refused.value).endswith("allowed: bespoke_punks, other")  # the default's name, then the others


def test_engine_without_lora_folder_refuses_any_name(switching_engine):
    from service.engine import Engine, GenerationRequest
    from service.lora.registry import LoraRegistry

    e = switching_engine
    settings = e.settings.model_copy(update={"loras_dir": Path("/nonexistent")})
    loras = LoraRegistry(e.loras.default, settings.expected_lora_rank)
    plain = Engine(e.pipe, settings, e.weights, loras)
    assert plain.lora_names == []
    with pytest.raises(ValueError, match="^lora: unknown LoRA 'other'; allowed: bespoke_punks$"):
        plain.generate(GenerationRequest(PROMPT, seed=1, lora="other"))


def test_a_switch_uses_the_start_up_inspection(switching_engine, monkeypatch):
    """check_loras inspected every file at load; a switch fuses from that, without reading the header again."""
    import service.lora.inspect

    engine = switching_engine
    other = engine.loras.files["other"]
    switcher = engine.loras.switcher
    assert switcher.loras[other].path == other and switcher.loras[engine.weights.lora] is engine.loras.default

    def no_reading(path, *args):
        raise AssertionError(f"{path} was inspected again")

    switch_seconds(engine, None)
    monkeypatch.setattr(service.lora.inspect, "read_tensor_table", no_reading)
    assert switch_seconds(engine, "other") > 0 and engine.loras.active == other
    assert switch_seconds(engine, None) > 0 and engine.loras.active == engine.weights.lora


def test_wrong_lora_in_the_folder_fails_at_startup(switching_engine, runs):
    from service.lora.switch import check_loras, find_loras

    assert find_loras(runs["dim128"].parent) == {p.stem: p for p in runs.values()}
    with pytest.raises(LoraError, match="SDXL"):
        check_loras(switching_engine.pipe, {"sdxl": runs["dim128"]}, expected_rank=32)


def test_switch_cost_is_measured(switching_engine):
    """Logs what a switch costs on the smoke model (CPU): restore the targeted layers + one checked fuse."""
    engine = switching_engine
    costs = []
    for name in ["other", None]:
        costs.append(switch_seconds(engine, name))
    log.warning(
        "LoRA switch on the CPU smoke model: %s s; base copy %.1f MB",
        ", ".join(f"{c:.3f}" for c in costs),
        engine.loras.switcher.base_bytes / 1e6,
    )
    assert all(c > 0 for c in costs) and engine.loras.active == engine.weights.lora
