"""Files that are complete or absent: checkpoints (`checkpoints`: atomic save, manifest,
verification, retention) and every other output (`staging`)."""
