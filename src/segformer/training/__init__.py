"""Training and evaluation: the run's config, dataset formats, augmentation, the loss,
checkpointing, distributed set-up, the loop, metrics and reports."""
