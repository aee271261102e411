"""Ray Serve application serving a compact layerwise recommender over HTTP.

`serve.app` holds the deployment, `build_app` (the Serve application builder) and `serve_main`;
`serve.schemas` the request/response models; `serve.loadtest` the load benchmark; `serve/config.yaml`
the Serve config file. Nothing is imported here, so `import serve.schemas` does not start Ray.
"""
