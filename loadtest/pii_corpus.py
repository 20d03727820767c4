"""Writes tests/data/pii_corpus.jsonl: labelled Chinese and English sentences for
loadtest/pii_eval.py. Deterministic (seeded); the file is checked in, this is how it was made.

    python -m loadtest.pii_corpus            rewrite the corpus

Each line: {"text", "lang": zh|en, "kind": pii|near_miss|plain, "spans": [{"start", "end", "type"}]}.
Identifiers are valid by construction and checked with python-stdnum (not with the recognizers
under test): IDs with a county code in force and the ISO 7064 check digit, cards with a network's
prefix and length and the Luhn digit, SSNs by stdnum's rules. Near misses look like identifiers
but are none: order, tracking and invoice numbers, timestamps, prices, versions, hotlines, dates,
an ID with a wrong check digit, order numbers that pass Luhn, loopback addresses, MAC addresses.
"""

from __future__ import annotations

import random
from pathlib import Path

import orjson
from stdnum import luhn, numdb
from stdnum.cn import ric
from stdnum.us import ssn

from loadtest.pii_templates import NEAR_MISS, NEAR_MISS_SLOTS, PII, PLAIN

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "pii_corpus.jsonl"
_MOBILE = ["130", "131", "133", "135", "136", "138", "139", "147", "150", "152", "155", "158", "159",
           "166", "177", "180", "183", "186", "188", "189", "191", "199"]
_AREAS = [("010", 8), ("021", 8), ("020", 8), ("022", 8), ("025", 8), ("027", 8), ("028", 8), ("029", 8),
          ("0755", 8), ("0571", 8), ("0512", 8), ("0532", 8), ("0731", 8), ("0371", 8), ("0898", 8),
          ("0851", 8), ("0935", 7), ("0997", 7)]
_US_AREAS = ["212", "415", "646", "312", "206", "617", "305", "713", "202", "480", "503", "718", "303"]
_NAMES = ["zhangwei", "li.na", "wang_fang", "liu.yang88", "chen.jing", "john.smith", "mary.j", "tom+orders",
          "alice", "bob.lee", "yu-hang", "xiaoming2020", "jane_doe", "s.kim", "hr.team"]
_DOMAINS = ["qq.com", "163.com", "126.com", "gmail.com", "outlook.com", "example.com.cn", "sina.cn",
            "corp-mail.com", "mail.tsinghua.edu.cn", "yahoo.co.jp", "company.io"]


def _counties() -> list[str]:
    """Six-digit county codes in force (no end year) from python-stdnum's table."""
    out = []
    for length, low, _high, _props, children in numdb.get("cn/loc").prefixes:
        if length == 2:
            out += [low + c[1] for c in children if c[0] == 4 and not c[3]["county"].startswith("[")
                    and not c[1].endswith("00")]
    return out


class Gen:
    """Valid identifiers in the written forms people use."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.counties = rng, _counties()

    def digits(self, n: int) -> str:
        return "".join(self.rng.choice("0123456789") for _ in range(n))

    def cn_resident_id(self) -> str:
        r = self.rng
        born = f"{r.randint(1950, 2008)}{r.randint(1, 12):02d}{r.randint(1, 28):02d}"
        body = r.choice(self.counties) + born + self.digits(3)
        number = body + ric.calc_check_digit(body + "0")
        assert ric.is_valid(number), number
        return number if r.random() > 0.1 else f"{number[:6]} {number[6:14]} {number[14:]}"

    def cn_mobile(self) -> str:
        n = self.rng.choice(_MOBILE) + self.digits(8)
        return self.rng.choice([n, n, n, f"{n[:3]} {n[3:7]} {n[7:]}", f"{n[:3]}-{n[3:7]}-{n[7:]}",
                                f"+86 {n}", f"+86-{n}", f"0086 {n}", f"(+86){n}"])

    def cn_landline(self) -> str:
        area, length = self.rng.choice(_AREAS)
        sub = str(self.rng.randint(2, 8)) + self.digits(length - 1)
        return self.rng.choice([f"{area}-{sub}", f"({area}){sub}", f"{area} {sub}",
                                f"+86 {area[1:]} {sub}", f"{area}-{sub[:-4]}-{sub[-4:]}"])

    def us_ssn(self) -> str:
        while True:
            n = f"{self.rng.randint(1, 899):03d}{self.rng.randint(1, 99):02d}{self.rng.randint(1, 9999):04d}"
            if ssn.is_valid(n):
                return f"{n[:3]}-{n[3:5]}-{n[5:]}"

    def us_phone(self) -> str:
        a, x, n = self.rng.choice(_US_AREAS), str(self.rng.randint(2, 9)) + self.digits(2), self.digits(4)
        if x[1:] == "11":
            x = x[0] + "20"
        return self.rng.choice([f"({a}) {x}-{n}", f"{a}-{x}-{n}", f"{a}.{x}.{n}", f"+1 {a} {x} {n}",
                                f"+1-{a}-{x}-{n}", f"1 ({a}) {x}-{n}"])

    def bank_card(self) -> str:
        r = self.rng
        prefix, length = r.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16), ("34", 15),
                                   ("37", 15), ("62", 16), ("62", 19), ("6222", 19), ("3528", 16),
                                   ("6011", 16), ("6228", 19)])
        body = prefix + self.digits(length - len(prefix) - 1)
        n = body + luhn.calc_check_digit(body)
        if length == 15:
            return r.choice([n, f"{n[:4]} {n[4:10]} {n[10:]}"])
        groups = " ".join(n[i : i + 4] for i in range(0, length, 4))
        return r.choice([n, n, groups, groups.replace(" ", "-")])

    def email(self) -> str:
        local = self.rng.choice([*_NAMES, self.digits(self.rng.randint(6, 11))])
        return f"{local}@{self.rng.choice(_DOMAINS)}"

    def ipv4(self) -> str:
        r = self.rng
        first = r.choice([36, 58, 59, 101, 112, 114, 120, 183, 202, 203, 211, 221, 8, 47, 52, 192, 10])
        if first == 192:
            return f"192.168.{r.randint(0, 255)}.{r.randint(1, 254)}"
        return f"{first}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}"

    def ipv6(self) -> str:
        r = self.rng
        head = r.choice(["2408:8207", "240e:3b0", "2409:8a55", "2001:da8", "2404:6800", "2a02:6b8"])
        groups = [f"{r.randint(0, 0xFFFF):x}" for _ in range(r.randint(2, 4))]
        compact = f"{head}::{':'.join(groups)}"
        full = ":".join([*head.split(":"), *(f"{r.randint(1, 0xFFFF):x}" for _ in range(6))])
        return r.choice([compact, full])

    # near misses
    def bad_id(self) -> str:
        """An ID-shaped number whose check digit is wrong (and that is no card either)."""
        while True:
            number = self.cn_resident_id().replace(" ", "")
            wrong = number[:17] + self.rng.choice([c for c in "0123456789X" if c != number[17]])
            if not (wrong[:2] in ("62", "81") and luhn.is_valid(wrong)):
                return wrong

    def luhn_order(self) -> str:
        """16 digits passing Luhn, starting with a digit no card network uses (1, 7, 8, 9)."""
        body = self.rng.choice("1789") + self.digits(14)
        return body + luhn.calc_check_digit(body)

    def bad_mobile(self) -> str:
        """11 digits after 1, with a prefix no carrier has (10x, 11x, 12x, 154, 194)."""
        return self.rng.choice(["10", "11", "12", "154", "194"]).ljust(3, "0") + self.digits(8)

    def bad_card(self) -> str:
        """A card-shaped number (a network's prefix and length) that fails Luhn."""
        body = self.rng.choice(["4", "51", "62"]) + self.digits(14)
        body = body[:15]
        return body + str((int(luhn.calc_check_digit(body)) + self.rng.randint(1, 9)) % 10)

    def cn_passport(self) -> str:
        r = self.rng
        return r.choice([f"E{self.digits(8)}", f"E{r.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{self.digits(7)}",
                         f"G{self.digits(8)}"])


def _fill(template: str, lang: str, kind: str, gen: Gen) -> dict[str, object]:
    """`{type}` slots become generated values; the spans record where each went."""
    text, spans, rest = "", [], template
    while "{" in rest:
        head, _, tail = rest.partition("{")
        slot, _, rest = tail.partition("}")
        text += head
        value = getattr(gen, slot)()
        spans.append({"start": len(text), "end": len(text) + len(value), "type": slot})
        text += value
    return {"text": text + rest, "lang": lang, "kind": kind, "spans": spans}


def build(seed: int = 19) -> list[dict[str, object]]:
    gen = Gen(random.Random(seed))
    rows = [_fill(t, lang, "pii", gen) for lang, t in PII for _ in range(3)]
    rows += [{"text": t, "lang": lang, "kind": "near_miss", "spans": []} for lang, t in NEAR_MISS]
    for lang, t in NEAR_MISS_SLOTS:
        for _ in range(3):
            row = _fill(t, lang, "near_miss", gen)
            rows.append({**row, "spans": []})
    rows += [{"text": t, "lang": lang, "kind": "plain", "spans": []} for lang, t in PLAIN]
    return rows


def main() -> None:
    rows = build()
    OUT.write_bytes(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in rows))
    print(f"wrote {OUT} ({len(rows)} sentences)")


if __name__ == "__main__":
    main()
