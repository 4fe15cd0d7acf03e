"""Ranking with a trained reranker: the one-pass ranker, resumable split ranking, calibration, fusion, generation."""
