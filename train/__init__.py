"""The demo model's training: a procedural punk generator (sprites.py), the small SD1.5-layout model
(model.py) and the training run (run.py). Development only: not in the GPU images."""
