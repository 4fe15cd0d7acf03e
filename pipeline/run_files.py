"""The names of the files and folders a run directory holds: the contract between the stages, the
analyses and the server (docs/design.md, "Run directories"), named once here.

Both stages write `CONFIG_YAML`, `RUN_JSON`, `METRICS_JSON` and `METRICS_MD`; the candidates and
rankings files are named by `pipeline.candidates`. A retriever run adds `DATASET_STATS`,
`RETRIEVER_SUMMARY` and its TensorBoard folder; a reranker run adds its adapter, the Trainer's
checkpoints, its TensorBoard folder and `TRAIN_SUMMARY`.
"""
from __future__ import annotations

CONFIG_YAML = "config.yaml"  # the fully resolved config
RUN_JSON = "run.json"  # provenance: command, commit, packages, machine, start/end, data digests
METRICS_JSON = "metrics.json"  # per split: retriever / subset / overall sections
METRICS_MD = "metrics.md"  # the same as a markdown table
DATASET_STATS = "dataset_stats.json"  # the preprocessed dataset's sizes, drops and repairs

RETRIEVER_SUMMARY = "retriever_summary.json"  # the retriever's fit: epochs, best epoch, validation history, seconds
RETRIEVER_TENSORBOARD = "tb"  # the retriever's train/loss and val/<metric> per epoch

ADAPTER_DIR = "adapter"  # the best adapter, peft format, + prompt_style.json
CHECKPOINT_DIR = "checkpoints"  # Trainer checkpoints (adapter, optimizer, scheduler, RNG, state)
RERANKER_TENSORBOARD = "tensorboard"  # the Trainer's train/loss per logging step, eval/<metric> per validation
TRAIN_SUMMARY = "train_summary.json"  # written last by training: its presence means training finished
