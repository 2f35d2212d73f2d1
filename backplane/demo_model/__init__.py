"""The demo model bundled with Backplane (served by ``backplane serve`` with no MODEL).

A 5.8M-parameter Llama (``LlamaForCausalLM``, bf16 safetensors, ~11.5 MB) with a
4096-token byte-level BPE tokenizer, trained from scratch on the public-domain
World English Bible by ``scripts/train_demo_model.py``. It writes recognisable,
Bible-flavoured English; it knows no facts and follows no instructions. See
docs/demo_model.md for how it was trained and what it can and cannot do.
"""

from __future__ import annotations

import os

__all__ = ["DEMO_MODEL_NAME", "default_model_path"]

#: The name the server reports for the demo model when no --served-model-name is given.
DEMO_MODEL_NAME = "backplane-demo-llama"

_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_model_path() -> str:
    """Directory holding the demo model's Hugging Face files (config, weights, tokenizer).

    Raises:
        FileNotFoundError: when the package was installed without its data files
            (the wheel or sdist left out package data), naming the missing files.
    """
    path = os.path.dirname(os.path.abspath(__file__))
    missing = [name for name in _FILES if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise FileNotFoundError(
            f"the bundled demo model in {path} is missing {missing}; reinstall backplane "
            "with its package data, or pass a model directory explicitly"
        )
    return path
