"""Precision and recall of the personal-data recognizers (policies/pii.py) on the labelled corpus
tests/data/pii_corpus.jsonl (written by loadtest/pii_corpus.py).

    python -m loadtest.pii_eval [--corpus FILE] [--show] [--check]

A found value counts as a true positive only with the labelled span and type exactly. Prints, per
type, true and false positives, misses, precision and recall; then the false positives on the
near-miss sentences and the recall over every labelled identifier. Targets (issue 19): no false
positive on a near miss, recall >= 0.98. `--show` lists every miss and false positive; `--check`
exits 1 when a target is not met.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from policies.pii import BUILTIN_NAMES, Recognizer

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "pii_corpus.jsonl"
RECALL_TARGET = 0.98


def load(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def score(rows: list[dict[str, Any]], recognizer: Recognizer) -> dict[str, Any]:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    near_fp, mistakes = 0, []
    for row in rows:
        want = {(s["start"], s["end"], s["type"]) for s in row["spans"]}
        got = {(f.start, f.end, f.kind) for f in recognizer.find(row["text"])}
        for _s, _e, kind in want & got:
            tp[kind] += 1
        for s, e, kind in got - want:
            fp[kind] += 1
            near_fp += row["kind"] == "near_miss"
            mistakes.append(f"false positive {kind:15} {row['text'][s:e]!r} in {row['text']!r}")
        for s, e, kind in want - got:
            fn[kind] += 1
            mistakes.append(f"missed         {kind:15} {row['text'][s:e]!r} in {row['text']!r}")
    return {"tp": tp, "fp": fp, "fn": fn, "near_fp": near_fp, "mistakes": mistakes}


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.3f}" if b else "  -  "


def report(rows: list[dict[str, Any]], result: dict[str, Any]) -> tuple[int, float]:
    tp, fp, fn = result["tp"], result["fp"], result["fn"]
    kinds = Counter(row["kind"] for row in rows)
    langs = Counter(row["lang"] for row in rows)
    print(f"{len(rows)} sentences: {dict(kinds)}, {dict(langs)}")
    print(f"{'type':16} {'values':>6} {'tp':>5} {'fp':>4} {'fn':>4} {'precision':>9} {'recall':>7}")
    for kind in BUILTIN_NAMES:
        n = tp[kind] + fn[kind]
        prec, rec = _ratio(tp[kind], tp[kind] + fp[kind]), _ratio(tp[kind], n)
        print(f"{kind:16} {n:6} {tp[kind]:5} {fp[kind]:4} {fn[kind]:4} {prec:>9} {rec:>7}")
    total_tp, total_fn, total_fp = sum(tp.values()), sum(fn.values()), sum(fp.values())
    recall = total_tp / (total_tp + total_fn) if total_tp + total_fn else 1.0
    print(f"{'all':16} {total_tp + total_fn:6} {total_tp:5} {total_fp:4} {total_fn:4} "
          f"{_ratio(total_tp, total_tp + total_fp):>9} {recall:7.3f}")
    print(f"false positives on near-miss sentences: {result['near_fp']} of {kinds['near_miss']} (target 0)")
    print(f"recall on valid identifiers: {recall:.3f} (target >= {RECALL_TARGET})")
    return result["near_fp"], recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--show", action="store_true", help="list every miss and false positive")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is not met")
    args = parser.parse_args()
    rows = load(args.corpus)
    result = score(rows, Recognizer())
    near_fp, recall = report(rows, result)
    if args.show:
        print("\n".join(result["mistakes"]))
    if args.check and (near_fp or recall < RECALL_TARGET):
        sys.exit(1)


if __name__ == "__main__":
    main()
