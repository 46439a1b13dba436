"""The MLflow model registry: versions, promotion, the served model and its safety net."""
