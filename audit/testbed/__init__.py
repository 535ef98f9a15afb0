"""Small real checkpoints built offline: the tiny random pipeline used by tests and the default
audit, and full-size architectures (random weights) for benchmarks."""
