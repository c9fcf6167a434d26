"""Cost of an architecture: the analytic model (`cost`: MACs, parameters, latency-table
sums) and measured latency (`latency`: per-choice latency tables, end-to-end timing)."""
