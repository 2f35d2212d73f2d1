"""Synthetic request sets: random token-id prompts of given lengths.

Random ids make the cost of a request depend only on its lengths, never on
what the text says, and need no dataset download. Ids are drawn from the
tokenizer's ordinary (non-special) range so that no prompt contains an EOS
marker by accident.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class BenchRequest:
    """One benchmark request: its prompt token ids and how many tokens to generate."""

    request_id: str
    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class WorkloadSpec:
    """What to generate: ``num_prompts`` prompts of ``input_len`` (or a uniform range).

    Attributes:
        num_prompts: number of requests.
        input_len: fixed prompt length, used when ``input_len_range`` is None.
        input_len_range: (low, high), both inclusive: each prompt's own length is uniform in it.
        output_len: tokens to generate per request (with ignore_eos, exactly this many).
        prefix_len: tokens of one random prefix shared by every prompt, placed before
            each prompt's own tokens (the shared-prefix workload).
        seed: seed of the random ids and lengths.
    """

    num_prompts: int
    output_len: int
    input_len: int | None = None
    input_len_range: tuple[int, int] | None = None
    prefix_len: int = 0
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the field and value when the spec cannot be built."""
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts ({self.num_prompts}) must be at least 1")
        if self.output_len < 1:
            raise ValueError(f"output_len ({self.output_len}) must be at least 1")
        if self.prefix_len < 0:
            raise ValueError(f"prefix_len ({self.prefix_len}) must not be negative")
        if self.input_len_range is not None:
            low, high = self.input_len_range
            if low < 1 or high < low:
                raise ValueError(
                    f"input_len_range ({low}, {high}) must satisfy 1 <= low <= high"
                )
        elif self.input_len is None or self.input_len < 1:
            raise ValueError(f"input_len ({self.input_len}) must be at least 1")

    @property
    def max_prompt_len(self) -> int:
        own = self.input_len_range[1] if self.input_len_range else int(self.input_len or 0)
        return self.prefix_len + own


def token_id_range(tokenizer) -> tuple[int, int]:
    """[low, high) of ids to draw prompts from: the tokenizer's ids after its special tokens."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = len(tokenizer)
    low = max(special) + 1 if special and max(special) < vocab // 2 else 0
    if vocab - low < 2:
        raise ValueError(f"tokenizer vocabulary ({vocab} ids) is too small to draw prompts from")
    return low, vocab


def build_requests(spec: WorkloadSpec, id_low: int, id_high: int) -> list[BenchRequest]:
    """The requests of ``spec`` with ids uniform in [id_low, id_high); deterministic per seed."""
    spec.validate()
    rng = random.Random(spec.seed)
    prefix = [rng.randrange(id_low, id_high) for _ in range(spec.prefix_len)]
    requests = []
    for i in range(spec.num_prompts):
        if spec.input_len_range is not None:
            own_len = rng.randint(*spec.input_len_range)
        else:
            own_len = int(spec.input_len)  # type: ignore[arg-type]
        own = [rng.randrange(id_low, id_high) for _ in range(own_len)]
        requests.append(BenchRequest(f"bench-{spec.seed}-{i}", prefix + own, spec.output_len))
    return requests


def kv_tokens_needed(requests: list[BenchRequest]) -> int:
    """Tokens of KV cache the whole request set needs if every request runs at once."""
    return sum(r.prompt_len + r.output_len for r in requests)


# The named workloads of issue 19 (`bench throughput --workload w1|w2|w3`). Explicit
# workload flags still win over a preset's values.
WORKLOAD_PRESETS: dict[str, dict] = {
    # Batch-1 decode: one request, 128 prompt tokens, 128 generated.
    "w1": {"num_prompts": 1, "input_len": 128, "output_len": 128, "prefix_len": 0},
    # Mixed prompt lengths: 64 requests, prompts uniform in 64..512, 128 generated.
    "w2": {"num_prompts": 64, "input_len_range": (64, 512), "output_len": 128, "prefix_len": 0},
    # Shared prefix: 64 x (one 400-token prefix + 32 own tokens), 128 generated.
    "w3": {"num_prompts": 64, "input_len": 32, "output_len": 128, "prefix_len": 400},
}

# What `bench throughput` uses for a field that neither a flag nor a preset set.
WORKLOAD_DEFAULTS: dict = {"num_prompts": 64, "input_len": 128, "output_len": 128,
                           "prefix_len": 0}


def resolve_workload_args(args) -> None:
    """Fill the workload fields of a `bench throughput` namespace in place.

    Precedence: an explicit flag, then ``--workload``'s preset, then WORKLOAD_DEFAULTS.
    A flag left unset is None; a prompt length given by flag (``--input-len`` or
    ``--input-len-range``) replaces the preset's, whichever form the preset used.
    """
    preset_name = getattr(args, "workload", None)
    if preset_name is not None and preset_name not in WORKLOAD_PRESETS:
        raise ValueError(f"--workload {preset_name!r}: expected one of {sorted(WORKLOAD_PRESETS)}")
    preset = WORKLOAD_PRESETS.get(preset_name, {})
    length_given = (getattr(args, "input_len", None) is not None
                    or getattr(args, "input_len_range", None) is not None)
    if not length_given:
        if preset.get("input_len_range") is not None:
            args.input_len_range = list(preset["input_len_range"])
        else:
            args.input_len = preset.get("input_len", WORKLOAD_DEFAULTS["input_len"])
    for name in ("num_prompts", "output_len", "prefix_len"):
        if getattr(args, name, None) is None:
            setattr(args, name, preset.get(name, WORKLOAD_DEFAULTS[name]))
