"""Ray Tune sweeps."""
