"""Benchmarks: each file runs on its own (`python3 benchmarks/<name>.py`); `real_weights/` holds the experiments of
`gpu_real_weights.py`. A package, so that no other `benchmarks` on the path can shadow it on the device."""
