"""Search: Ray Tune + Optuna over kept layers, bridges and healing (`tuning` drives the search, `trial` is
one trial in a worker), the typed YAML search spaces (`space`), what a finished search produces (`results`:
the front, the champion, the registry), and the Optuna search over layer subsets behind the `nas`
baseline (`nas`)."""
