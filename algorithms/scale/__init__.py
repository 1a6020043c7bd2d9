"""Training on more than one process or with fewer trainable weights: data parallel, FSDP, LoRA."""
