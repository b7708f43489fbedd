"""Tools, not library code: pc-bench with its reference and peers, the service benchmark, the load test."""
