"""Pooling models (embeddings): prefill-only requests whose output is one vector each.

`pooler` reads how to pool (sentence-transformers' modules.json and
1_Pooling/config.json), `attention` is the dense prefill-only attention the
pooling runner uses, `engine_core` batches requests and runs them.
"""
