"""Files that ship inside the package."""

from pathlib import Path

# SD1.5's small config JSONs and CLIP tokenizer files, so single-file checkpoints load with no hub access.
SD15_CONFIG_DIR = Path(__file__).parent / "sd15_config"
