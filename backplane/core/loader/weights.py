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


class CheckpointTensor:
    """One tensor of a checkpoint, read from disk only when (and as far as) it is asked for.

    Tensor-parallel ranks read just their slice with `read_slice`, so no rank
    ever holds a whole sharded tensor. A plain ``torch.Tensor`` can be wrapped
    too (`from_tensor`), for callers that already hold the values.
    """

    def __init__(self, name: str, shape: tuple[int, ...], reader, slicer) -> None:
        self.name = name
        self.shape = tuple(shape)
        self._reader = reader
        self._slicer = slicer

    @classmethod
    def from_tensor(cls, name: str, tensor: torch.Tensor) -> CheckpointTensor:
        return cls(name, tuple(tensor.shape), lambda: tensor,
                   lambda index: tensor[index])

    def read(self) -> torch.Tensor:
        """The whole tensor."""
        return self._reader()

    def read_slice(self, dim: int, start: int, length: int) -> torch.Tensor:
        """``length`` entries along ``dim`` from ``start``; only those are read from the file."""
        if not (0 <= start and start + length <= self.shape[dim]):
            raise ValueError(
                f"weight {self.name!r}: slice {start}:{start + length} of dim {dim} is outside "
                f"its shape {list(self.shape)}")
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._slicer(index)


def iterate_weights(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of every file, on the CPU."""
    for name, lazy in iterate_checkpoint(files):
        yield name, lazy.read()


def iterate_checkpoint(files: list[str]) -> Iterator[tuple[str, CheckpointTensor]]:
    """Yield ``(name, CheckpointTensor)`` for every tensor of every file; nothing is read
    until the consumer asks.

    Each read maps the file anew and unmaps it when done: one mapping held over the
    whole load keeps every page read so far resident, so a load peaked at twice the
    weights (once in their parameters, once in the mapping).
    """
    from safetensors import safe_open

    def read(path: str, name: str, index=None) -> torch.Tensor:
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.get_tensor(name) if index is None else f.get_slice(name)[index]

    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape())
                      for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        for name, shape in shapes.items():
            yield name, CheckpointTensor(
                name, shape, lambda path=path, name=name: read(path, name),
                lambda index, path=path, name=name: read(path, name, index))
