"""Value functions: LoRA + head on a backbone of the base model's family, checkpoints, registry, scorer."""
