"""Benchmark the word policies: 1 MB prompt against a 50,000-word list, and streaming cost.

Usage: python -m loadtest.bench_policies [--words 50000] [--mb 1] [--runs 7]
Prints: table build and compile times; pyahocorasick vs ahocorasick-rs on the same normalized
text; full `Matcher.find` time; StreamScanner and ChunkFilter CPU per chunk, and what that costs
at 500 streaming requests/s. Figures are medians of `--runs` runs on this machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ahocorasick
import ahocorasick_rs

from policies.normalize import normalize, tables
from policies.stream import ChunkFilter, StreamScanner
from policies.words import Matcher

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests/data/benign_sentences.txt"
LATIN = "abcdefghijklmnopqrstuvwxyz"


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, Any]:
    """Median seconds over `runs` calls, and the last result."""
    times, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def word_list(n: int, rng: random.Random) -> list[str]:
    """Half Latin words (4-10 letters), half Chinese words (2-4 common characters)."""
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 3500)]
    words: set[str] = set()
    while len(words) < n // 2:
        words.add("".join(rng.choice(LATIN) for _ in range(rng.randint(4, 10))))
    while len(words) < n:
        words.add("".join(rng.choice(han) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def prompt(size: int, words: list[str], rng: random.Random) -> str:
    sentences = [s for s in CORPUS.read_text(encoding="utf-8").splitlines() if s and not s.startswith("#")]
    parts, n = [], 0
    while n < size:
        s = rng.choice(sentences) if rng.random() > 0.01 else f" {rng.choice(words)} "
        parts.append(s + " ")
        n += len(s) + 1
    return "".join(parts)[:size]


def bench_match(args: argparse.Namespace, rng: random.Random) -> tuple[list[str], Matcher]:
    t = time.perf_counter()
    tables()
    print(f"normalization tables (once per process): {time.perf_counter() - t:.2f} s")
    words = word_list(args.words, rng)
    build_s, matcher = timed(lambda: Matcher.from_texts(["\n".join(words)], max_gap=2), 1)
    print(f"compile {len(words)} words (normalize + ahocorasick-rs): {build_s:.2f} s")
    text = prompt(int(args.mb * 1_000_000), words, rng)
    norm_s, n = timed(lambda: normalize(text), args.runs)
    keys = [normalize(w).compact for w in words]
    py = ahocorasick.Automaton()
    for i, k in enumerate(keys):
        py.add_word(k, i)
    py.make_automaton()
    impl = ahocorasick_rs.Implementation.ContiguousNFA  # what Matcher uses
    rs = ahocorasick_rs.AhoCorasick(keys, store_patterns=False, implementation=impl)
    py_s, py_hits = timed(lambda: sum(1 for _ in py.iter(n.compact)), args.runs)
    rs_s, rs_hits = timed(lambda: len(rs.find_matches_as_indexes(n.compact, overlapping=True)), args.runs)
    find_s, hits = timed(lambda: matcher.find(text), args.runs)
    print(f"prompt: {len(text):,} characters, compact {len(n.compact):,}")
    print(f"  normalize (NFKC-ish, folds, t2s, offsets): {norm_s * 1e3:7.1f} ms")
    print(f"  raw Aho-Corasick, pyahocorasick:            {py_s * 1e3:7.1f} ms ({py_hits} raw hits)")
    print(f"  raw Aho-Corasick, ahocorasick-rs:           {rs_s * 1e3:7.1f} ms ({rs_hits} raw hits)")
    print(f"  Matcher.find total (target < 50 ms):        {find_s * 1e3:7.1f} ms ({len(hits)} hits)")
    return words, matcher


def chunks_of(text: str, rng: random.Random) -> list[str]:
    """Token-sized pieces (1-6 characters), like an LLM's stream."""
    out, i = [], 0
    while i < len(text):
        k = rng.randint(1, 6)
        out.append(text[i : i + k])
        i += k
    return out


def bench_stream(matcher: Matcher, label: str, rng: random.Random, runs: int) -> None:
    text = CORPUS.read_text(encoding="utf-8")
    pieces = chunks_of(text, rng)

    def scan() -> int:
        s, held = StreamScanner(matcher), 0
        for p in pieces:
            s.feed(p)
            held = max(held, s.held)
        s.flush()
        return held

    def relay(flt: ChunkFilter | None) -> int:
        sent = 0
        for p in pieces:
            ch = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
            ch["choices"] = [{"index": 0, "delta": {"content": p}, "logprobs": None, "finish_reason": None}]
            sent += len(flt.feed(ch)) if flt is not None else 1
        return sent

    scan_s, max_held = timed(scan, runs)
    base_s, _ = timed(lambda: relay(None), runs)
    filt_s, _ = timed(lambda: relay(ChunkFilter(matcher, "mask")), runs)
    per_scan = scan_s / len(pieces) * 1e6
    per_chunk = (filt_s - base_s) / len(pieces) * 1e6
    print(f"stream, {label}: {len(pieces)} chunks of 1-6 characters, hold bound {matcher.hold_bound}")
    print(f"  StreamScanner.feed: {per_scan:6.1f} us/chunk, {len(pieces) / scan_s:,.0f} chunks/s/core")
    print(f"  ChunkFilter.feed added CPU: {per_chunk:6.1f} us/chunk (max hold seen {max_held} chars)")
    for tokens in (100, 500):
        cores = 500 * tokens * per_chunk / 1e6
        print(f"  at 500 req/s x {tokens} chunks each: {cores:.2f} CPU cores for output filtering")
    print(f"  added time to first token: ~{per_chunk:.0f} us CPU (+ hold only if it starts a listed word)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--words", type=int, default=50_000)
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(7)
    _, big = bench_match(args, rng)
    paths = [ROOT / "config/words/zh.txt", ROOT / "config/words/en.txt"]
    shipped = Matcher.from_texts([p.read_text(encoding="utf-8") for p in paths])
    bench_stream(shipped, "shipped example lists", rng, args.runs)
    bench_stream(big, f"{args.words} words", rng, args.runs)


if __name__ == "__main__":
    main()
