"""QLoRA training: formatting, the held-out split, settings, the training job and its results."""
