"""Benchmarks: end-to-end throughput/latency, scorer, peers, memory, soak (`pipeline bench`)."""
