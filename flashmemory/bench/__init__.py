"""``flashmemory bench``: GPU benchmarks that print Markdown tables, one reproducing command per
row. ``kernel`` times the LSA decode kernel against SDPA; ``decode`` times whole-model steps."""
