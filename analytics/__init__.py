"""Dashboards and experiment reports over ClickHouse; ``stats`` computes A/B-test statistics from sums."""
