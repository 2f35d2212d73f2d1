"""Platforms for testing the conformance kit itself (loaded by ``module:attribute``).

`good` implements the contract (with a simple graph runner, so the graph tests
run); `buggy` breaks it in ways the kit must catch: an attention backend that
writes padding tokens into the cache, one that ignores the cached prefix, one
that ignores the softmax scale it is given, one that claims a sliding window
but attends to everything, a reduce_scatter that returns the wrong shard, a
graph runner that replays the capture-time inputs and disagrees with its own
flag, and a policy that accepts graph capture it cannot do. `silent_policy`
changes a setting without a reason; `legacy_policy` still implements only the
deprecated ``check_and_update_config``.
"""

from __future__ import annotations

import torch

from backplane.plugins_sdk import (
    Communicator,
    ConfigDecision,
    ConfigPolicy,
    GraphRunner,
    Platform,
    ReferenceAttentionBackend,
)
from backplane.plugins_sdk.reference import ReferenceAttentionMetadata


def _runtime():
    from backplane.platforms.cpu.runtime import CpuRuntime

    return CpuRuntime()


class EagerGraphRunner(GraphRunner):
    """Static buffers per batch size; replay copies inputs in and re-runs the callable."""

    def __init__(self) -> None:
        self._graphs: dict[int, tuple] = {}

    def capture(self, fn, example_inputs, batch_size):
        self._graphs[batch_size] = (fn, [t.clone() for t in example_inputs])

    def captured_sizes(self):
        return sorted(self._graphs)

    def replay(self, inputs, batch_size):
        fn, static = self._graphs[batch_size]
        for buffer, value in zip(static, inputs, strict=True):
            buffer.copy_(value)
        return fn(*static)


class StaleGraphRunner(EagerGraphRunner):
    """Bug: never copies new inputs into the static buffers."""

    def replay(self, inputs, batch_size):
        fn, static = self._graphs[batch_size]
        return fn(*static)


class PaddingWriterBackend(ReferenceAttentionBackend):
    """Bug: writes every token, padding included (slot -1 = the cache's last slot)."""

    name = "writes_padding"

    def forward(self, query, key, value, kv_cache, metadata, scale):
        total = key.shape[0]
        slots = torch.cat([metadata.slot_mapping,
                           torch.full((total - metadata.num_actual_tokens,), -1,
                                      dtype=torch.int64)])
        kv_heads, head = self.spec.num_kv_heads, self.spec.head_size
        kv_cache[0].view(-1, kv_heads, head)[slots] = key
        kv_cache[1].view(-1, kv_heads, head)[slots] = value
        return super().forward(query, key, value, kv_cache, metadata, scale)


class PrefixIgnorerBackend(ReferenceAttentionBackend):
    """Bug: attends only to the step's own tokens, never to the cached prefix."""

    name = "ignores_prefix"

    def build_metadata(self, common) -> ReferenceAttentionMetadata:
        meta = super().build_metadata(common)
        meta.key_slots = [slots[len(slots) - (end - start):]
                          for (start, end), slots in zip(meta.query_ranges, meta.key_slots,
                                                         strict=True)]
        return meta


class FixedScaleBackend(ReferenceAttentionBackend):
    """Bug: uses 1/sqrt(head_size) whatever softmax scale forward is given."""

    name = "fixed_scale"

    def forward(self, query, key, value, kv_cache, metadata, scale):
        return super().forward(query, key, value, kv_cache, metadata,
                               self.spec.head_size**-0.5)


class WindowIgnorerBackend(ReferenceAttentionBackend):
    """Bug: claims sliding-window support but attends to the whole context."""

    name = "ignores_window"
    supports_sliding_window = True


class WrongShardCommunicator(Communicator):
    """Bug: every rank gets shard 0 of reduce_scatter."""

    def reduce_scatter(self, tensor, dim=0):
        return self.all_reduce(tensor.clone()).chunk(self.world_size, dim=dim)[0].contiguous()


class PermissivePolicy(ConfigPolicy):
    """Bug: refuses nothing."""

    def check_and_update(self, view):
        return ConfigDecision()


class SilentPolicy(ConfigPolicy):
    """Bug: changes the KV cache size without saying so in ConfigDecision.changes."""

    def check_and_update(self, view):
        view.kv_cache_memory_bytes = 1 << 30
        return ConfigDecision()


class LegacyPolicy(ConfigPolicy):
    """Written for SDK 1.0: overrides only the deprecated check_and_update_config(config)."""

    def check_and_update_config(self, config):
        return ConfigDecision()


class GoodPlatform(Platform):
    name = "good"
    supports_graph_capture = True

    def __init__(self):
        super().__init__(_runtime())

    def attention_backends(self):
        return [ReferenceAttentionBackend]

    def make_graph_runner(self):
        return EagerGraphRunner()


class BuggyPlatform(Platform):
    name = "buggy"
    supports_graph_capture = False

    def __init__(self):
        super().__init__(_runtime(), PermissivePolicy())

    def attention_backends(self):
        return [PaddingWriterBackend, PrefixIgnorerBackend, FixedScaleBackend,
                WindowIgnorerBackend]

    def make_communicator(self, group=None):
        return WrongShardCommunicator(group)

    def make_graph_runner(self):
        return StaleGraphRunner()


class SilentPolicyPlatform(GoodPlatform):
    name = "silent_policy"

    def __init__(self):
        Platform.__init__(self, _runtime(), SilentPolicy())


class LegacyPolicyPlatform(GoodPlatform):
    name = "legacy_policy"

    def __init__(self):
        Platform.__init__(self, _runtime(), LegacyPolicy())
