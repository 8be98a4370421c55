"""Watching a running fleet: the status document, Prometheus metrics, the HTTP endpoint."""
