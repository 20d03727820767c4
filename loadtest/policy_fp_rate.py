"""Print the false-positive rate of the word lists over the benign corpus.

Usage: python -m loadtest.policy_fp_rate [--words config/words/zh.txt ...] [--corpus FILE] [--max-gap N]
Exits 1 when any benign sentence is hit. Hits are reported by line and list entry ("file:line"),
never by the word itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from policies.words import Matcher

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORDS = [ROOT / "config/words/zh.txt", ROOT / "config/words/en.txt"]
DEFAULT_CORPUS = ROOT / "tests/data/benign_sentences.txt"


def load_corpus(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(i, s) for i, s in enumerate(lines, start=1) if s.strip() and not s.startswith("#")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--words", nargs="+", type=Path, default=DEFAULT_WORDS)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--max-gap", type=int, default=2)
    args = ap.parse_args(argv)
    texts = [p.read_text(encoding="utf-8") for p in args.words]
    matcher = Matcher.from_texts(texts, max_gap=args.max_gap, names=[p.name for p in args.words])
    corpus = load_corpus(args.corpus)
    flagged = []
    for number, sentence in corpus:
        hits = matcher.find(sentence)
        if hits:
            flagged.append((number, sorted({matcher.source(h.word_id) for h in hits})))
    for number, sources in flagged:
        print(f"  hit: {args.corpus.name}:{number} by {', '.join(sources)}")
    rate = len(flagged) / len(corpus) if corpus else 0.0
    print(f"benign sentences: {len(corpus)}  hit: {len(flagged)}  false-positive rate: {rate:.2%}")
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
