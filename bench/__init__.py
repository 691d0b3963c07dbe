"""Benchmarks: scripts that print throughput, latency percentiles and memory (never tests)."""
