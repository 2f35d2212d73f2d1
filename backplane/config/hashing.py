"""`compute_hash`: a stable key for artefacts that depend on the configuration.

The hash covers what changes compiled graphs or numerics (model and its HF
config, dtypes, block size, context length, parallel layout, compilation and
optimization level, attention backend, platform, Backplane major.minor) and
nothing operational (ports, log levels, served names, seeds, memory sizes), so
restarting a server on another port reuses its compiled artefacts while a
dtype change does not. It is computed from a canonical JSON document, so the
same config gives the same hash in every process and on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from packaging.version import Version

if TYPE_CHECKING:
    from backplane.config.engine import EngineConfig

# Keys of a transformers config that describe the file, not the model.
_HF_VOLATILE_KEYS = frozenset({"transformers_version", "_name_or_path", "_commit_hash"})


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # torch.dtype and friends


def hf_config_dict(hf_config: Any) -> dict[str, Any] | None:
    """The model's config as a canonical dict without file-only keys."""
    if hf_config is None:
        return None
    raw = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(vars(hf_config))
    return {k: _jsonable(v) for k, v in sorted(raw.items()) if k not in _HF_VOLATILE_KEYS}


def hash_factors(config: EngineConfig) -> dict[str, Any]:
    """Everything `compute_hash` covers, as a plain dict (useful to explain a changed hash)."""
    from backplane.version import __version__

    mc, cc, pc = config.model_config, config.cache_config, config.parallel_config
    release = Version(__version__).release
    return {
        "backplane": f"{release[0]}.{release[1] if len(release) > 1 else 0}",
        "platform": config.platform_name or config.device_config.device,
        "model": os.path.normpath(mc.model),
        "hf_config": hf_config_dict(mc.hf_config),
        "dtype": str(mc.torch_dtype).removeprefix("torch.") if mc.torch_dtype else mc.dtype,
        "max_model_len": mc.max_model_len,
        "block_size": cc.block_size,
        "kv_cache_dtype": cc.kv_cache_dtype,
        "tensor_parallel_size": pc.tensor_parallel_size,
        "pipeline_parallel_size": pc.pipeline_parallel_size,
        "optimization_level": 0 if config.enforce_eager else config.optimization_level,
        "compilation": _jsonable(asdict(config.compilation_config)),
        "attention_backend": config.attention_backend_name or config.device_config.attention_backend,
    }


def compute_config_hash(config: EngineConfig) -> str:
    """sha256 hex digest of `hash_factors` in canonical JSON."""
    text = json.dumps(_jsonable(hash_factors(config)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
