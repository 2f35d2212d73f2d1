"""Chained block hashes for prefix caching.

A full block's hash covers its parent's hash, its own token ids and any extra
keys (e.g. a LoRA or multimodal id), so equal hashes mean equal whole prefixes,
not just equal blocks. Python's tuple hash of ints is deterministic (no hash
randomisation for ints) and 64-bit; a collision would need two different
prefixes to agree on all 64 bits, which we accept as vLLM does for its fast
builtin-hash mode.
"""

from __future__ import annotations

from collections.abc import Sequence

# Parent hash of a request's first block.
ROOT_HASH = hash(("backplane-prefix-root",))


def hash_block(parent: int, token_ids: Sequence[int], extra_keys: tuple = ()) -> int:
    """Hash of one full block given its parent block's hash."""
    return hash((parent, tuple(token_ids), extra_keys))


def extend_block_hashes(
    hashes: list[int],
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple = (),
    cache_salt: str | None = None,
) -> list[int]:
    """Append hashes for every full block of ``token_ids`` not hashed yet; returns ``hashes``.

    ``cache_salt`` enters the first block's hash only; since every later hash
    chains through it, the whole prefix is then private to that salt.
    """
    num_full = len(token_ids) // block_size
    parent = hashes[-1] if hashes else ROOT_HASH
    for index in range(len(hashes), num_full):
        start = index * block_size
        keys = extra_keys if index or cache_salt is None else (*extra_keys, ("salt", cache_salt))
        parent = hash_block(parent, token_ids[start : start + block_size], keys)
        hashes.append(parent)
    return hashes
