"""Measurement harness: the benchmark model zoo (zoo), the stdlib LM trainer (train_lm) and quality metrics."""
