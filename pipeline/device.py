"""Device names from config ("auto", "cpu", "cuda", "cuda:1") -> a device string, for both stages."""
from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def resolve_device(device: str) -> str:
    """"auto" = cuda when a GPU is visible, else cpu; a CUDA device without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device {device!r} requested but no CUDA GPU is available: use device auto or cpu")
    return device
