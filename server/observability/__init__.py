"""Metrics and logs: what operators see of a running server or worker."""
