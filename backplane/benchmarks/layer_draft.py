"""A draft model cut from a trained model: its first N decoder layers (early exit).

Speculative decoding needs a draft that agrees with the target often and costs
little. Random benchmark weights agree with nothing, and this machine cannot
train one; a model's own first layers, followed by its final norm and output
head, are a free draft with the target's tokenizer (the self-speculative idea
of LayerSkip and Draft & Verify), good enough to measure real acceptance on a
trained model such as the bundled demo model.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from safetensors import safe_open
from safetensors.torch import save_file

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def make_layer_draft(model_dir: str, out_dir: str, num_layers: int) -> dict:
    """Write the first ``num_layers`` layers of ``model_dir`` as a model in ``out_dir``."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    total = int(config.get("num_hidden_layers", 0))
    if not 1 <= num_layers < total:
        raise ValueError(f"num_layers ({num_layers}) must be in 1..{total - 1} for a model "
                         f"of {total} layers")
    files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {model_dir!r}")
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for name in files:
        with safe_open(os.path.join(model_dir, name), framework="pt") as f:
            for key in f.keys():
                layer = _LAYER.search(key)
                if layer is None or int(layer.group(1)) < num_layers:
                    tensors[key] = f.get_tensor(key)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config["num_hidden_layers"] = num_layers
    for key in ("layer_types",):  # per-layer lists must shrink with the layers
        if isinstance(config.get(key), list):
            config[key] = config[key][:num_layers]
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(model_dir):
        if name.endswith((".json", ".jinja", ".txt", ".model")) and name != "config.json" \
                and not name.endswith(".safetensors.index.json"):
            shutil.copy(os.path.join(model_dir, name), os.path.join(out_dir, name))
    return {"source": model_dir, "out": out_dir, "layers": f"{num_layers} of {total}",
            "tensors": len(tensors)}
