"""Pieces shared by both stages: config, data (load, preprocess, split), metrics, file formats,
run directories. `retrieval` and `rerank` import from here; nothing here imports them."""
