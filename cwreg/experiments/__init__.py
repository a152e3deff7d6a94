"""The paper's experiments: λ sweeps, statistics, tables, records, figures, benchmarks, Table 8."""
