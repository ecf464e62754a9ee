"""Stage 2: per-class prompts."""
