"""HTTP delivery: the callback and health routes, the /v1 API, the operator pages."""
