"""Sinks: images to object storage (filesystem or S3) and results plus metrics to ClickHouse, idempotently."""
