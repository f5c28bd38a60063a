"""slice-ft: full fine-tuning of a deterministic slice of a Wan video transformer."""
