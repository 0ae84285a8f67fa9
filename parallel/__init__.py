"""Process groups, launch environment, data parallelism and cross-rank helpers."""
