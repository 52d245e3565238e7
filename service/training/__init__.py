"""Train a kohya LoRA the way that worked (rank 32 / alpha 16 on SD1.5, 512 px renderings of 24x24 sprites,
10 epochs), evaluate every epoch with `lora evaluate` and keep the best: `punks train DATA` and Cog's `train`.

data.py reads and checks the portraits and captions, captions.py writes missing captions, recipe.py holds the
settings and refuses the ones that failed, loop.py trains, run.py puts it together."""
