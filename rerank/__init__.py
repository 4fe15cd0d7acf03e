"""Second stage: LLM reranking of the retriever's candidates.

prompting   label schemes and their token ids, the one prompt format for training and inference
model       model/tokenizer sources (tiny-qwen2, smollm2-135m-instruct offline, any HF model), LoRA, readout
inference   the one-pass ranker, split ranking, calibration, fusion, generation baseline
training    samples, collation, losses, validation, the Trainer and its stages
evaluation  metrics sections, evidence, the markdown report, figures
top level   run, load_run, dry_run, export, preflight, overfit (see docs/design.md, "Package layout and layers")
"""
