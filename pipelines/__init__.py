"""The pipelines of the model routes, below HTTP (api/) and above the runners: decode, prepare, run, explain, shape."""
