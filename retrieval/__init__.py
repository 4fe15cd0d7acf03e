"""First-stage retrieval: LRURec (ours), popularity, and RecBole baselines; candidates files."""
