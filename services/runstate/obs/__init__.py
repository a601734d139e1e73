"""Observability adapters: Prometheus metrics, probes and structured logs for the
consumer (wired in pipeline/app.py) and the gateway (gateway/app.py)."""
