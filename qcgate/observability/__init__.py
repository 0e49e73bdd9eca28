"""Observability: Prometheus metrics and a health endpoint that reflects real liveness."""
