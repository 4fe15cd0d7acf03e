"""The one module that imports recbole (1.2.1); every compatibility workaround lives here.

The rest of the code base imports recbole only through this module:

    from retrieval.recbole_compat import recbole_model_class, make_recbole_config, Interaction

We use recbole's model classes, its `Config` (for each model's own default hyper-parameters
and field names) and its batch transforms (BERT4Rec's masking), never its Trainer, datasets
or dataloaders (about 10x slower than feeding the model classes our own batches, measured on ML-100K).

Workarounds, and why each is needed:
1. numpy-2 aliases (`np.float_`, `np.complex_`, `np.unicode_`, `np.bool8`), set before recbole
   is imported: numpy 2 removed them. `Config.__init__` runs recbole's own
   `compatibility_settings()`, which reads `np.float_`/`np.complex_`/`np.unicode_` (and then
   sets the old `np.float`, `np.int`, ... names that recbole's Interaction and metrics use);
   `recbole.quick_start` imports ray.tune, whose TensorBoard logger reads `np.bool8`.
   Only missing names are added; numpy-1 installs are left untouched.
2. `Config` subclass that ignores the command line: recbole's Config parses every
   `--key=value` in sys.argv into hyper-parameters, so our scripts' own flags (or pytest's)
   would leak into the models.
3. ... and that does not touch the environment: recbole's `_init_device` sets
   CUDA_VISIBLE_DEVICES (hiding all GPUs but one for the whole process); we pass the device.
4. autograd anomaly detection restored after the import: importing
   `recbole.model.sequential_recommender` runs `torch.autograd.set_detect_anomaly(True)` at
   module level (sine.py), which records a Python stack trace for every autograd op in the
   whole process (measured on ML-100K, max_len 50, batch 64, 1 thread: NARM 235 vs 75 ms per
   step, SASRec 158 vs 81; it would slow LRURec too once recbole is imported).
Not needed here: `torch.load(weights_only=False)` (only recbole's Trainer and pretrained-model
loaders call torch.load; our checkpoints are plain state dicts), `setuptools<81` (only
`recbole.quick_start` imports ray; we never import it), `pandas<3` (only recbole's Dataset
fills NaNs through pandas; we never build one).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

# 1. numpy-2 aliases, before any recbole import.
_NUMPY2_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_, "bool8": np.bool_}
for _name, _target in _NUMPY2_ALIASES.items():
    if not hasattr(np, _name):
        setattr(np, _name, _target)

_anomaly_before = torch.is_anomaly_enabled()
_anomaly_check_nan_before = torch.is_anomaly_check_nan_enabled()

from recbole.config import Config  # noqa: E402  (must follow the numpy aliases)
from recbole.data.interaction import Interaction  # noqa: E402
from recbole.data.transform import construct_transform  # noqa: E402
from recbole.model.abstract_recommender import SequentialRecommender  # noqa: E402
from recbole.model.sequential_recommender import BERT4Rec, GRU4Rec, NARM, SASRec  # noqa: E402

# 4. undo recbole's process-wide set_detect_anomaly(True).
torch.autograd.set_detect_anomaly(_anomaly_before, check_nan=_anomaly_check_nan_before)

__all__ = [
    "Interaction",
    "MODEL_CLASSES",
    "SequentialRecommender",
    "construct_transform",
    "make_recbole_config",
    "recbole_model_class",
]

# Our retriever.model names -> recbole model classes.
MODEL_CLASSES: dict[str, type[SequentialRecommender]] = {
    "sasrec": SASRec,
    "bert4rec": BERT4Rec,
    "narm": NARM,
    "gru4rec": GRU4Rec,
}

# Dataset name given to Config. It has no properties/dataset/<name>.yaml in recbole, so Config
# reads only recbole's packaged overall/model/sample YAMLs ("ml-100k" would pull in that
# dataset's field settings). Config never opens data files; data_path is only a string.
CONFIG_DATASET_NAME = "llmrerank"


def recbole_model_class(name: str) -> type[SequentialRecommender]:
    try:
        return MODEL_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown recbole model {name!r}: choose one of {', '.join(MODEL_CLASSES)}") from None


class _LocalConfig(Config):
    """recbole Config without its process-wide side effects (workarounds 2 and 3)."""

    def __init__(self, model: type, device: torch.device, params: dict[str, Any]):
        self._device = torch.device(device)  # read by _init_device during super().__init__
        super().__init__(model=model, dataset=CONFIG_DATASET_NAME, config_dict=params)

    def _load_cmd_line(self) -> dict:
        return {}  # 2: sys.argv belongs to our scripts, not to recbole

    def _init_device(self) -> None:
        # 3: what recbole's single-process branch sets, minus os.environ["CUDA_VISIBLE_DEVICES"].
        self.final_config_dict.update(device=self._device, single_spec=True, local_rank=0)


def make_recbole_config(model: type[SequentialRecommender], params: dict[str, Any], device: torch.device) -> Config:
    """recbole Config for `model`: recbole's packaged defaults (overall, sequential, the model's
    YAML), then `params` on top. CE loss needs `train_neg_sample_args: None` (recbole refuses
    negative sampling with CE), so that default is set here unless `params` overrides it."""
    return _LocalConfig(model, device, {"train_neg_sample_args": None, **params})
