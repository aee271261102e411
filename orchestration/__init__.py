"""Glue around the `layerwise` library: the CLI, the pipeline, Ray, DeepSpeed, Tune and MLflow."""
