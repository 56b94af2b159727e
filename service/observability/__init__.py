"""Prometheus metrics, exact across every process of a server, and their multiprocess plumbing."""
