"""The PUMA migration adapter: maps a source prompt ``[l, d_s]`` to a target prompt ``[l, d_t]``."""

from models.adapter.config import AdapterConfig
from models.adapter.folded import FoldedAdapter, fold
from models.adapter.model import PumaAdapter, adapter_from_bytes, adapter_to_bytes

__all__ = [
    "AdapterConfig",
    "FoldedAdapter",
    "PumaAdapter",
    "adapter_from_bytes",
    "adapter_to_bytes",
    "fold",
]
