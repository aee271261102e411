"""Evaluation: ranking a model's held-out targets (evaluate), the ranking metrics (metrics), the
statistics that compare models (stats), the per-user slices (scenarios) and the noise floor (noise).
Nothing here imports layerwise.compression: a model is judged the same way whoever made it.
"""
