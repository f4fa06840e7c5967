"""Training: the loop (`trainer`), optimizers, schedules, the step guard, signals, metrics,
resume policy and several processes (`distributed`)."""
