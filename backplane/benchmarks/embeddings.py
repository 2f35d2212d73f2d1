"""Embedding throughput: Backplane's `LLM.embed` vs sentence-transformers' ``encode``.

    python -m backplane.benchmarks.embeddings --model DIR [--batch-size 64] [--num 1024]

Both embed the same sentences (varied lengths, 5-40 words) in batches of
``--batch-size`` after one warm-up batch; prints sentences/s of each, the
ratio and the lowest cosine similarity between the two (a correctness check).
sentence-transformers must be installed for the comparison column.
"""

from __future__ import annotations

import argparse
import json
import random
import time

_WORDS = ("the a cat dog runs over under quickly lazy model server token vector "
          "embedding sentence river mountain city light dark blue green small "
          "large engine batch prompt answer question").split()


def sentences(num: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 40))) + "."
            for _ in range(num)]


def _timed(fn, texts: list[str], batch: int) -> tuple[float, list]:
    fn(texts[:batch])  # warm-up
    start = time.perf_counter()
    out = []
    for i in range(0, len(texts), batch):
        out.extend(fn(texts[i : i + batch]))
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    import torch

    from backplane import LLM

    texts = sentences(args.num)
    llm = LLM(model=args.model, dtype=args.dtype, runner="pooling",
              max_num_seqs=args.batch_size, max_num_batched_tokens=args.batch_size * 128)
    ours_s, ours = _timed(
        lambda b: [o.outputs.embedding for o in llm.embed(b, use_tqdm=False)],
        texts, args.batch_size)
    result = {"model": args.model, "batch_size": args.batch_size, "num": args.num,
              "backplane_sentences_per_s": round(args.num / ours_s, 1)}
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        result["sentence_transformers"] = "not installed"
    else:
        st = SentenceTransformer(args.model, device="cpu")
        ref_s, ref = _timed(
            lambda b: list(st.encode(b, batch_size=args.batch_size, convert_to_tensor=True)),
            texts, args.batch_size)
        cos = torch.nn.functional.cosine_similarity(
            torch.tensor(ours), torch.stack(ref).float())
        result.update(
            sentence_transformers_sentences_per_s=round(args.num / ref_s, 1),
            ratio=round(ref_s / ours_s, 2), min_cosine=round(float(cos.min()), 6),
        )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
