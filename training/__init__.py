"""Demo-model training (not installed: run from a checkout)."""
