"""Training a LoRA adapter: the trainer CLI, its factories, fault recovery, dispatch, GPU preflight."""
