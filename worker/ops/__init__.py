"""Running it: metrics, the exporter, logs, health, the reconciler."""
