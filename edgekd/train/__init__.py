"""Training and distillation: pure loss functions, checkpoints, and the one stateful training loop."""
