"""Reading a model directory's config.json through transformers."""

from __future__ import annotations

import os


def load_hf_config(model: str, trust_remote_code: bool = False):
    """The transformers config of ``model`` (a local directory, or a cached hub id).

    Raises FileNotFoundError naming the directory when config.json is missing.
    """
    from transformers import AutoConfig

    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"model directory {model!r} has no config.json")
    if not os.path.exists(model) and (model.startswith((".", "/")) or os.sep in model.strip("/")
                                       and model.count("/") != 1):
        raise FileNotFoundError(f"model path {model!r} does not exist")
    return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
