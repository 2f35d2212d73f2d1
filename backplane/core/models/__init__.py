"""Model definitions and the registry mapping HF architectures to them."""

from backplane.core.models.base import CausalLM, KVCacheShape, WeightShapeError
from backplane.core.models.registry import (
    register_model,
    resolve_model_class,
    supported_architectures,
)

__all__ = [
    "CausalLM",
    "KVCacheShape",
    "WeightShapeError",
    "register_model",
    "resolve_model_class",
    "supported_architectures",
]
