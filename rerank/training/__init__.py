"""Training the reranker: samples, encoding, losses, validation, the Trainer and its stages."""
