"""The model: sources (hub, path, offline stand-ins), the LoRA adapter, the readout head, version shims."""
