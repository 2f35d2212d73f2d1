"""Finding and reading a checkpoint's safetensors files.

Both layouts Hugging Face writes are supported: one ``model.safetensors``,
or shards listed in ``model.safetensors.index.json``. Tensors are read one at a
time (memory-mapped by safetensors), so peak memory stays near one tensor
beyond the model itself.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def resolve_model_dir(model: str) -> str:
    """The local directory of ``model``: the path itself, or a hub id's cached snapshot.

    Never downloads. Raises FileNotFoundError naming ``model`` when neither exists.
    """
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, local_files_only=True)
    except Exception as exc:  # any failure means "not available locally"
        raise FileNotFoundError(
            f"model {model!r} is neither a local directory nor in the local Hugging Face "
            "cache (Backplane does not download models)"
        ) from exc


def safetensors_files(model_dir: str) -> list[str]:
    """Paths of the checkpoint's safetensors files, in a stable order.

    Raises FileNotFoundError naming the missing file(s) when the index lists a
    shard that is absent, or when the directory holds no safetensors at all.
    """
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{index_path} is not a valid safetensors index: {exc}") from exc
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(model_dir, name))]
        if missing:
            raise FileNotFoundError(
                f"safetensors shard(s) listed in {index_path} are missing: {', '.join(missing)}"
            )
        return [os.path.join(model_dir, name) for name in files]
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    found = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if found:
        return found
    others = sorted(os.path.basename(p) for p in glob.glob(os.path.join(model_dir, "*.bin")))
    hint = f" (found {', '.join(others)}: only safetensors weights are supported)" if others else ""
    raise FileNotFoundError(
        f"no safetensors weights in {model_dir!r}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}"
    )


def iterate_weights(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of every file, on the CPU."""
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
