"""Building blocks of model definitions: attention, linear, norms, rotary, activations."""

from backplane.core.layers.activation import SiluAndMul
from backplane.core.layers.attention import Attention, AttentionContext
from backplane.core.layers.embedding import LMHead, VocabEmbedding
from backplane.core.layers.linear import MergedLinear
from backplane.core.layers.norm import RMSNorm
from backplane.core.layers.rotary import ApplyRotary, RotaryEmbedding, apply_rotary, rope_parameters

__all__ = [
    "ApplyRotary",
    "Attention",
    "AttentionContext",
    "LMHead",
    "MergedLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "SiluAndMul",
    "VocabEmbedding",
    "apply_rotary",
    "rope_parameters",
]
