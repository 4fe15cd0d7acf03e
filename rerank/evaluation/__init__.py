"""Measuring a reranker run: metrics sections, evidence (bootstrap, top-1 slots), markdown, the run's figures."""
