"""Shared test setup. Expensive fixtures live in tests/*_fixtures.py and are imported where used."""

import os

# Before anything imports torch/nnunetv2/ray: bounded threads, no telemetry, no auth for local Ray.
os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
