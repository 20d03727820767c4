"""Validators for the personal-data recognizers (policies/pii.py): check digits, number plans and
the tables they need. Each takes the candidate's digits (ASCII, separators removed) and answers
whether it is a real identifier of its kind. Pure; the region table is read once from the kept
`python-stdnum` data (every PRC county code, historical ones included).

Hand-written on purpose: measured per call (`python -m loadtest.bench_privacy --checks`), stdnum's
`cn.ric.is_valid` costs ~20 us against ~2.5 us here, `luhn.is_valid` ~3 us against ~1 us,
`us.ssn.is_valid` ~4.5 us against ~0.4 us, and `phonenumbers.parse` + `is_valid_number` ~17-20 us
against ~0.3 us for the NANP rules and the mainland prefixes. stdnum's ID check also refuses an ID
whose county was created after the holder's birth year, which real IDs (issued later, with the
county then in force) do have; its county table is what `cn_regions` reads.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from functools import cache

# ---- check digits -----------------------------------------------------------------------------


def luhn(digits: str) -> bool:
    """ISO/IEC 7812 (Luhn) check over all digits, the last being the check digit."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_MOD11_2_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))


def iso7064_mod11_2(number: str) -> bool:
    """ISO 7064 MOD 11-2 over 17 digits and a check character (0-9 or X), as in PRC resident IDs."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    total = sum(w * (ord(c) - 48) for w, c in zip(_MOD11_2_WEIGHTS, number, strict=False))
    check = (12 - total % 11) % 11
    return number[17] == ("X" if check == 10 else str(check))


# ---- PRC resident ID ------------------------------------------------------------------------------


@cache
def cn_regions() -> frozenset[str]:
    """Every six-digit county code in python-stdnum's table (GB/T 2260, past and present)."""
    from stdnum import numdb

    codes: set[str] = set()
    for length, low, high, _props, children in numdb.get("cn/loc").prefixes:
        if length != 2:
            continue
        for province in range(int(low), int(high) + 1):
            for clen, clow, chigh, _p, _c in children:
                if clen == 4:
                    codes.update(f"{province:02d}{c:04d}" for c in range(int(clow), int(chigh) + 1))
    return frozenset(codes)


def cn_resident_id(number: str) -> bool:
    """18 characters: a county code that exists (or existed), a real birth date from 1900 on, a
    sequence number and the ISO 7064 MOD 11-2 check character."""
    if not iso7064_mod11_2(number) or number[:6] not in cn_regions():
        return False
    try:
        born = datetime.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    return datetime.date(1900, 1, 1) <= born <= datetime.date(2099, 12, 31)


# ---- phone numbers ----------------------------------------------------------------------------------

# mainland mobile prefixes in use (MIIT allocations): 13x, 145-149, 15x but 154, 162/165-167,
# 170-178, 18x, 19x but 194
_CN_MOBILE = frozenset(
    [f"13{d}" for d in range(10)]
    + [f"14{d}" for d in range(5, 10)]
    + [f"15{d}" for d in range(10) if d != 4]
    + ["162", "165", "166", "167"]
    + [f"17{d}" for d in range(9)]
    + [f"18{d}" for d in range(10)]
    + [f"19{d}" for d in range(10) if d != 4]
)


def cn_mobile(digits: str) -> bool:
    """11 digits (after +86 / 0086 / 86) with an allocated three-digit prefix."""
    for prefix in ("0086", "86"):
        if len(digits) == 11 + len(prefix) and digits.startswith(prefix):
            digits = digits[len(prefix) :]
    return len(digits) == 11 and digits[:3] in _CN_MOBILE


def cn_landline(digits: str) -> bool:
    """An area code (010, 02x: then 8 digits; 03xx-09xx: then 7 or 8) and a subscriber number
    that does not start with 0 or 1. `digits` carries the area code's 0 (a +86 form is given
    with it put back)."""
    if len(digits) < 10 or digits[0] != "0":
        return False
    if digits[1] in "12":
        if digits[1] == "1" and digits[2] != "0":
            return False
        area, rest = digits[:3], digits[3:]
        return len(rest) == 8 and rest[0] not in "01" and area != "000"
    rest = digits[4:]
    return digits[1] in "3456789" and len(rest) in (7, 8) and rest[0] not in "01"


def nanp(digits: str) -> bool:
    """A North American number: optional country code 1, area code and exchange each [2-9]XX and
    not N11, area codes with a middle 9 (reserved for expansion) refused."""
    if len(digits) == 11 and digits[0] == "1":
        digits = digits[1:]
    if len(digits) != 10:
        return False
    area, exchange = digits[:3], digits[3:6]
    if area[0] in "01" or area[1:] == "11" or area[1] == "9":
        return False
    return exchange[0] not in "01" and exchange[1:] != "11"


# ---- payment cards, SSN -------------------------------------------------------------------------------

# (first digits, lengths): networks whose cards circulate in China and the US (ISO/IEC 7812 IINs)
_IIN: tuple[tuple[tuple[int, int, int], tuple[int, ...]], ...] = (
    ((1, 4, 4), (13, 16, 19)),  # Visa
    ((2, 51, 55), (16,)),  # Mastercard
    ((4, 2221, 2720), (16,)),  # Mastercard 2-series
    ((2, 34, 34), (15,)),  # American Express
    ((2, 37, 37), (15,)),
    ((2, 62, 62), (16, 17, 18, 19)),  # UnionPay
    ((2, 81, 81), (16, 17, 18, 19)),  # UnionPay 81 (domestic)
    ((4, 3528, 3589), (16, 17, 18, 19)),  # JCB
    ((4, 6011, 6011), (16, 17, 18, 19)),  # Discover
    ((3, 644, 649), (16, 17, 18, 19)),
    ((2, 65, 65), (16, 17, 18, 19)),
    ((3, 300, 305), (14, 15, 16, 17, 18, 19)),  # Diners Club
    ((2, 36, 36), (14, 15, 16, 17, 18, 19)),
    ((2, 38, 39), (16, 17, 18, 19)),
)


def bank_card(digits: str) -> bool:
    """A payment card: a known network's prefix, one of its lengths, and the Luhn check. A random
    number passes Luhn one time in ten; the prefix and length rules are what keep order numbers out."""
    n = len(digits)
    if not 13 <= n <= 19 or not digits.isdigit():
        return False
    heads = (0, int(digits[0]), int(digits[:2]), int(digits[:3]), int(digits[:4]))
    for (width, low, high), lengths in _IIN:
        if n in lengths and low <= heads[width] <= high:
            return luhn(digits)
    return False


_SSN_NEVER_ISSUED = frozenset({"078051120", "457555462", "219099999"})  # advertised samples


def us_ssn(digits: str) -> bool:
    """Area not 000, 666 or 9xx; group not 00; serial not 0000; not a famous sample number."""
    if len(digits) != 9 or digits in _SSN_NEVER_ISSUED:
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


# checks a deployment's own pattern may name in config (privacy.patterns[].validator)
VALIDATORS: dict[str, Callable[[str], bool]] = {
    "luhn": luhn,
    "iso7064_mod11_2": iso7064_mod11_2,
    "cn_resident_id": cn_resident_id,
    "cn_mobile": cn_mobile,
    "nanp": nanp,
    "us_ssn": us_ssn,
    "bank_card": bank_card,
}
