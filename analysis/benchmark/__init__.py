"""The reranker's speed and memory claims, each a ratio measured in one run (scripts/benchmark.py).

Every figure compares our path with a baseline on the same model, the same prompts and the same
batches, timed interleaved (ours, baseline, ours, ...) after warm-up runs, median of the repeats:

- ranking_overhead: `rerank.ranker.rank_rows` (prompt building, tokenizing, length-sorted batching,
  scoring) vs the floor: a bare `model(input_ids, attention_mask, logits_to_keep=1, use_cache=False)`
  under inference_mode over the same prompts, already tokenized and padded into the same batches.
  The prompt building alone (`encode_rows`) is timed beside them.
- generation_speedup: one-pass ranking (the same `rank_rows` runs) vs generating a ranked list of
  every label (`rerank.generation.generate_rankings`, mode "list", at least a complete list's tokens
  decoded per user) for the same users.
- merged_vs_adapter: one-pass ranking (`rank_rows`, the same prompts and batches) with the LoRA
  merged into the weights (`rerank.export.merge_lora`, what scripts/export_model.py saves) vs the
  unmerged PeftModel (base + low-rank path at every adapted layer). Reported, no target.
- training_memory / training_time: one optimizer step (forward, loss, backward, AdamW) with the
  loss only at the supervised positions (`rerank.train.supervised_logits` + cross-entropy, as
  `RerankTrainer.compute_loss`) vs the stock causal-LM loss (`model(..., labels=...)`: logits at
  every position over the whole vocabulary), same batch, same LoRA model. Peak memory: see
  analysis/peak_memory.py; the logits tensors' sizes are reported beside it as computed figures.
- lora_layout_time: one optimizer step with reranker.loss, LoRA on every linear layer of the top N
  layers (reranker.lora_layers) vs the paper's q_proj/v_proj in every layer (and every linear layer
  everywhere, timed beside them): a fresh base model per layout, same batch.
- batching_padding / batching_time: length-ordered batches (the ranker's) vs arrival order (file
  order): exact padding token counts, and the ranker's scorer timed on both batchings.

The model is the untrained base with a fresh LoRA adapter (speed does not depend on the adapter's
values); `random_architecture` builds a random-init Qwen2.5-size model with the real Qwen2
tokenizer instead, for GPU measurements without a hub.

settings.py: what a run measures and the targets; inputs.py: rows, model, training batch;
timing.py: interleaved timing and a figure's record; ranking.py and training.py: the figures;
run.py: the whole run (`run_benchmark`); report.py: benchmark.md.
"""
