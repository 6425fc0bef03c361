"""Data: TFDS sources (prepared offline from the original files) and the step-indexed loader."""
