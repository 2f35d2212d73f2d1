"""Reading Hugging Face model directories: config, safetensors weights, tokenizer."""

from backplane.core.loader.hf_config import load_hf_config
from backplane.core.loader.model_loader import MissingWeightsError, load_model
from backplane.core.loader.tokenizer import load_tokenizer
from backplane.core.loader.weights import iterate_weights, resolve_model_dir, safetensors_files

__all__ = [
    "MissingWeightsError",
    "iterate_weights",
    "load_hf_config",
    "load_model",
    "load_tokenizer",
    "resolve_model_dir",
    "safetensors_files",
]
