"""Tools, not library code: pc-bench (with the notebook-style reference and peer cases), the service benchmark and load test."""
