"""lowrank-surgery: surgery on low-rank adapters of large language models."""
