"""The demo model: a small SD1.5-layout model and rank-32 kohya LoRA trained on generated punk portraits
(train/: `python -m train.run`, then `python -m train.assemble`), shipped in the repository so that a machine
without SD1.5 still draws a real punk. Loaded, announced loudly, when no real weights are configured."""

from pathlib import Path

DEMO_DIR = Path(__file__).parent / "demo_model"
DEMO_FOLDER = "stable-diffusion-v1-5"  # diffusers layout, fp16 files
DEMO_LORA = "bespoke_punks.safetensors"  # rank 32, alpha 16, trained on the crisp renderings
DEMO_LOG = "training-log.json"  # what train/run.py logged: device, versions, step counts, losses


def demo_model_present() -> bool:
    return (DEMO_DIR / DEMO_FOLDER / "model_index.json").is_file() and (DEMO_DIR / DEMO_LORA).is_file()
