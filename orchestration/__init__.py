"""Glue around the `layerwise` library, one subpackage per capability: the command line (`cli`), the study
(`study`), the baselines table (`baselines`), the search (`search`), the main job (`pipeline`), planning past
one machine (`scale`), Ray and DeepSpeed (`distributed`) and MLflow (`tracking`). Each imports only those
after it in that list (tests/test_import_graph.py checks it)."""
