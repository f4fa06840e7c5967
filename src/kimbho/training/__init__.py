"""Training: the loop (`trainer`), optimizers, the fused loss, the step guard, signals, metrics,
resume policy and several processes (`distributed`)."""
