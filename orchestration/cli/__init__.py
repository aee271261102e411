"""The `layerwise` command line: `main` builds the argparse tree from one module per command group (`data`;
`model`: train, evaluate, score, compress, bench; `experiments`: run, baselines, tune, study; `deploy`:
serve, bench-serve, plan) and dispatches. Handlers parse nothing themselves and call the capability
packages; nothing outside this package imports it."""
