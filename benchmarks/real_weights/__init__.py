"""The real default base trained and judged on one GPU with the product's code: the experiments of
`benchmarks/gpu_real_weights.py`, one module each, over the helpers in `common`."""
