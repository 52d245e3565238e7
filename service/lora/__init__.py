"""LoRA files: reading them without a model (inspect, layout), fusing them into SD1.5 (fuse), serving several
(switch), and the `lora inspect|diff` and `evaluate` commands (report, evaluate)."""
