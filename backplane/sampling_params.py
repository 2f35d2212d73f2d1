"""SamplingParams: how one request's tokens are chosen, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from backplane.core.structured_outputs.params import StructuredOutputsParams

# Below this temperature sampling is treated as greedy (avoids dividing by ~0).
_GREEDY_EPS = 1e-5
# Integers travel to the device as int64 (top_k, seeds, token ids): anything outside
# that range would overflow there, inside the engine loop, instead of failing here.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Most completions one request may ask for. Each is a sequence with its own KV
# blocks, so this bounds the work and memory a single request can claim. Servers
# usually set a lower limit of their own (`backplane serve --max-n`).
MAX_N = 16384
# The smallest normal and the largest finite float32: the sampler's tensors are float32.
FLOAT32_TINY = 1.1754943508222875e-38
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class SamplingParams:
    """Sampling parameters with vLLM's names and meanings.

    Processing order in the sampler: penalties, logit_bias, allowed_token_ids
    and bad_words (tokens outside the allowed set, and the last token of a bad
    word whose other tokens were just generated, get -inf), temperature, min_p,
    top_k, top_p. ``temperature=0`` is greedy. ``logprobs=k`` returns the top-k
    log-probabilities of each generated token plus the chosen one, computed from
    the raw logits (before any processing); ``prompt_logprobs=k`` likewise for
    prompt tokens.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # A JSON schema, regex, choice list, grammar or structural tag the output must
    # follow (vLLM's `structured_outputs`); a dict is turned into the params object.
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the engine: token ids that end generation (EOS and friends).
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    # Filled by the engine from the tokenizer/generation config (kept out of repr).
    eos_token_ids: frozenset[int] = field(default_factory=frozenset, repr=False)
    # Filled by the engine: each bad word as token ids (with and without a leading space).
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is not None:
            self.bad_words = [self.bad_words] if isinstance(self.bad_words, str) else list(
                self.bad_words)
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        elif self.structured_outputs is not None and not isinstance(
                self.structured_outputs, StructuredOutputsParams):
            raise ValueError(
                "structured_outputs must be a StructuredOutputsParams or a dict, got "
                f"{type(self.structured_outputs).__name__}")
        self._validate()
        self.all_stop_token_ids = set(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def _validate(self) -> None:
        def bad(name: str, value, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {value!r}")

        for name in ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs",
                     "prompt_logprobs"):
            value = getattr(self, name)
            if isinstance(value, bool) or (value is not None and not isinstance(value, int)):
                raise bad(name, value, "an integer")
            if value is not None and not INT64_MIN <= value <= INT64_MAX:
                raise bad(name, value, f"within the 64-bit integer range [{INT64_MIN}, {INT64_MAX}]")
        if self.n < 1 or self.n > MAX_N:
            raise bad("n", self.n, f"in [1, {MAX_N}]")
        # The sampler works in float32: values that round to 0 or overflow there
        # would silently change meaning (top_p 0 keeps no token, a penalty of 0
        # divides by zero), so they are refused here.
        if not _finite(self.temperature) or self.temperature < 0 or self.temperature > FLOAT32_MAX:
            raise bad("temperature", self.temperature, f"in [0, {FLOAT32_MAX:g}]")
        if not _finite(self.top_p) or not FLOAT32_TINY <= self.top_p <= 1.0:
            raise bad("top_p", self.top_p, f"in [{FLOAT32_TINY:g}, 1] (float32)")
        if self.top_k < 0:
            raise bad("top_k", self.top_k, "0 or -1 (disabled) or >= 1")
        if not _finite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, ">= 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, ">= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2.0 <= value <= 2.0:
                raise bad(name, value, "in [-2, 2]")
        if not _finite(self.repetition_penalty) or not (
            FLOAT32_TINY <= self.repetition_penalty <= FLOAT32_MAX
        ):
            raise bad(
                "repetition_penalty", self.repetition_penalty,
                f"in [{FLOAT32_TINY:g}, {FLOAT32_MAX:g}] (> 0, as a float32)",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise bad(name, value, "None or an integer >= 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", self.stop, "non-empty strings")
        for tid in self.stop_token_ids:
            if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid <= INT64_MAX:
                raise bad("stop_token_ids", tid, "a list of token ids (integers >= 0)")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise bad("allowed_token_ids", [], "a non-empty list of token ids, or None")
            for tid in self.allowed_token_ids:
                if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid <= INT64_MAX:
                    raise bad("allowed_token_ids", tid, "a list of token ids (integers >= 0)")
        if self.bad_words is not None and any(
            not isinstance(w, str) or not w.strip() for w in self.bad_words
        ):
            raise bad("bad_words", self.bad_words, "a list of non-empty strings")
        if self.logit_bias:
            for tid, bias in self.logit_bias.items():
                if not 0 <= tid <= INT64_MAX or not _finite(bias) or not -100.0 <= bias <= 100.0:
                    raise bad(f"logit_bias[{tid}]", bias, "in [-100, 100] for a token id >= 0")

    def clone_for_child(self, index: int) -> SamplingParams:
        """Params for the ``index``-th of ``n`` completions (n=1, own seed stream)."""
        import copy

        child = copy.copy(self)
        child.n = 1
        if self.seed is not None:
            # Wrap within int64 so that a seed near the top of the range stays valid.
            child.seed = (self.seed + index - INT64_MIN) % 2**64 + INT64_MIN
        return child


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class BeamSearchParams:
    """Parameters of `LLM.beam_search` (vLLM's names and meanings).

    Attributes:
        beam_width: beams kept per prompt, and sequences returned. Each step asks
            the engine for 2 * beam_width top logprobs per beam, so beam_width can
            be at most half the engine's max_logprobs (20 by default: 10).
        max_tokens: tokens generated at most per sequence.
        ignore_eos: keep going after an end-of-sequence token (it then counts as
            an ordinary token instead of finishing the beam).
        temperature: 0 is deterministic. The candidates are always ranked by
            raw logprobs; a temperature above 0 only adds each step's sampled
            token to a beam's candidates.
        length_penalty: the final ranking divides a sequence's cumulative
            logprob by its length (prompt included, a final EOS not) to this power.
        include_stop_str_in_output: keep the EOS token that finished a sequence
            in its ``tokens`` (the text never shows it).
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not 1 <= self.beam_width <= INT64_MAX:
            raise ValueError(f"beam_width must be >= 1, got {self.beam_width}")
        if not 1 <= self.max_tokens <= INT64_MAX:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not _finite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
