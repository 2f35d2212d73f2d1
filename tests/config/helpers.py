"""Small builders shared by the config tests: in-memory HF configs and fake platforms."""

from __future__ import annotations

from backplane.config import EngineArgs, EngineConfig
from backplane.plugins_sdk import ConfigPolicy, Platform


def llama_hf_config(**overrides):
    """A tiny LlamaConfig in memory (no files): 4 heads, 2 kv heads, head_dim 16."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, dtype="float32",
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def engine_config(hf=None, **args) -> EngineConfig:
    """An EngineConfig from EngineArgs fields with an in-memory model config."""
    config = EngineArgs(model=args.pop("model", "/models/tiny"), **args).create_engine_config()
    config.model_config.hf_config = hf if hf is not None else llama_hf_config()
    return config


def cpu_platform():
    from backplane.platforms.cpu.platform import CpuPlatform

    return CpuPlatform()


class GraphPlatform(Platform):
    """A platform that compiles and captures graphs (stands in for an accelerator)."""

    name = "fakegpu"
    compile_backend = "fake_backend"
    supports_graph_capture = True

    def __init__(self, policy: ConfigPolicy | None = None) -> None:
        from backplane.platforms.cpu.runtime import CpuRuntime

        super().__init__(CpuRuntime(), policy)

    def attention_backends(self):
        from backplane.platforms.cpu.attention import CpuSdpaAttentionBackend

        return [CpuSdpaAttentionBackend]
