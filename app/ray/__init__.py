"""The service on Ray Serve: `python -m app.ray`, or `serve run deploy/ray/serve.yaml` (builder:
`app.ray.deployments:build`). See README, "Scaling out on Ray Serve"."""
