"""edge-runtime: federated heterogeneous-rank LoRA fine-tuning on edge devices."""

__version__ = "0.1.0"
