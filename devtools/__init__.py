"""Development-only code: the random smoke model, checkpoint and LoRA writers, the Cog schema generator.

Not copied into the GPU images (Dockerfile, cog build context).
"""
