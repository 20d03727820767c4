"""The personal-data types the recognizer (policies/pii.py) knows: each one's pattern, the check
its candidates must pass (policies/pii_checks.py), the words that must or must not surround it,
its placeholder label; and a deployment's own patterns turned into types. Pure.

A value never starts or ends inside a longer run of letters or digits, nor one joined to it by
`-` or `.` (LEFT, RIGHT). Context words decide only where the shape alone is ambiguous: a passport
number and the bare (unseparated) forms of landlines, SSNs and US numbers need one nearby; a number
whose nearest label is an order, tracking or invoice word is not taken; a dotted quad after
"version" or "section" is no address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from policies import pii_checks as checks

# a value is not glued to a longer token: no letter, digit, `_` or `@` next to it, nor a
# letter or digit joined by `-` or `.` ("SN-4111...", "v1.2.3.4", "13812345678.5")
LEFT = r"(?<![\dA-Za-z_@])(?<![\dA-Za-z][.\-])"
RIGHT = r"(?![\dA-Za-z_@])(?![.\-][\dA-Za-z])"
_SEP = r"[ \-]"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_BEFORE, _AFTER = 24, 12  # characters searched for context words around a value

_PHONE_WORDS = (
    r"电话|手机|座机|固话|联系|致电|拨打|来电|热线|传真|号码|phone|tel|mobile|cell|call|fax|contact"
)
_LABELS = re.compile(
    r"(?P<pos>身份证|证件|银行卡|信用卡|储蓄卡|卡号|护照|"
    + _PHONE_WORDS
    + r"|card|ssn|social security|passport)"
    r"|(?P<neg>订单|单号|运单|快递|物流|发票|流水|交易号|编号|工单|批次|序列号|型号|版本|"
    r"order|tracking|invoice|transaction|serial|sku|ref\b|reference|version|build)",
    re.IGNORECASE,
)
# a dotted quad after one of these is a version or section number ("version 1.2.3.4", "§ 4.1.1.2")
_VERSION = re.compile(
    r"(?:version|ver\.?|release|build|section|sec\.|chapter|clause|§|版本号?|固件|章节?|条款?|第)\s*[:：]?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class PiiType:
    name: str
    label: str  # placeholder label: [LABEL_n]
    pattern: str  # without the boundaries
    check: Callable[[str, str], str | None]  # (value, its digits) -> normalized key, or None
    context: re.Pattern[str] | None = None  # words one of which must be near the value ...
    bare_only: bool = False  # ... only when the value is a plain run of digits
    labelled: bool = True  # refuse a number whose nearest label is an order / tracking word
    not_after: re.Pattern[str] | None = None  # words that, just before it, make it something else
    lane: str = "digits"  # where its values may start (policies/pii.py Recognizer)

    def key(self, text: str, start: int, end: int) -> str | None:
        """The normalized value of the candidate text[start:end], or None when it is none."""
        value = text[start:end]
        key = self.check(value, digits(value))
        if key is None:
            return None
        if self.context is not None and (not self.bare_only or value.isdigit()):
            near = text[max(0, start - _BEFORE) : start] + " " + text[end : end + _AFTER]
            if self.context.search(near) is None:
                return None
        if self.labelled and _last_label(text[max(0, start - 16) : start]) == "neg":
            return None
        if self.not_after is not None and self.not_after.search(text, max(0, start - 16), start):
            return None
        return key


def _last_label(before: str) -> str | None:
    """'pos' or 'neg': the kind of the label nearest before a number (None: no label)."""
    last = None
    for m in _LABELS.finditer(before):
        last = m.lastgroup
    return last


_SEPARATORS = {ord(c): None for c in " -+().:"} | {ord("x"): "X"}


def digits(value: str) -> str:
    """The value's digits (the text is scanned with full-width digits read as ASCII), an X check
    character kept, without the separators of a number; other characters stay."""
    return value.translate(_SEPARATORS)


def _by(validator: Callable[[str], bool]) -> Callable[[str, str], str | None]:
    return lambda _value, digits: digits if validator(digits) else None


def _landline(_value: str, digits: str) -> str | None:
    for prefix in ("0086", "86"):
        if digits.startswith(prefix) and not digits.startswith("0", len(prefix)) and len(digits) > 11:
            digits = "0" + digits[len(prefix) :]
            break
        if digits.startswith(prefix + "0"):
            digits = digits[len(prefix) :]
            break
    return digits if checks.cn_landline(digits) else None


def _us_phone(_value: str, digits: str) -> str | None:
    if not checks.nanp(digits) or digits[-9:-7] == "00":  # N00 area codes: 400/800 service numbers
        return None
    return digits[-10:]


def _address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Loopback, unspecified, link-local, multicast and reserved addresses name no one's host
    (127.0.0.1, 0.0.0.0, 169.254.169.254, ::1): not personal data. Private ones may (a home LAN)."""
    a = address
    if a.is_loopback or a.is_unspecified or a.is_link_local or a.is_multicast or a.is_reserved:
        return None
    return str(a)


def _ipv4(value: str, _digits: str) -> str | None:
    try:
        return _address(ipaddress.IPv4Address(value))
    except ValueError:
        return None


def _ipv6(value: str, _digits: str) -> str | None:
    if value.count(":") < 2 or not any(c.isdigit() for c in value):  # "dead::beef", "Foo::Bar" in code
        return None
    try:
        return _address(ipaddress.IPv6Address(value))
    except ValueError:
        return None


def _email(value: str, _digits: str) -> str | None:
    local = value.partition("@")[0]
    if local.startswith(".") or local.endswith(".") or ".." in value:
        return None
    return value.lower()


def _context(words: str) -> re.Pattern[str]:
    return re.compile(words, re.IGNORECASE)


BUILTIN: tuple[PiiType, ...] = (
    PiiType(
        "email",
        "EMAIL",
        r"(?<![.%+\-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}",
        _email,
        labelled=False,
        lane="email",
    ),
    PiiType(
        "cn_resident_id",
        "ID",
        r"\d{6}[ ]?(?:18|19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])[ ]?\d{3}[\dXx]",
        lambda _v, d: d if checks.cn_resident_id(d) else None,
    ),
    PiiType(
        "cn_mobile",
        "PHONE",
        r"(?:\(?(?:\+|00)?86\)?[ \-]?)?1[3-9]\d(?:\d{8}|" + _SEP + r"\d{4}" + _SEP + r"\d{4})",
        lambda _v, d: d[-11:] if checks.cn_mobile(d) else None,
    ),
    PiiType(
        "cn_landline",
        "PHONE",
        r"(?:(?:\+|00)86[ \-]?(?:\(0?(?:10|2\d|[3-9]\d\d)\)|0?(?:10|2\d|[3-9]\d\d))[ \-]?"
        r"|\(0\d{2,3}\)[ \-]?|0\d{2,3}[ \-])[2-9]\d{2,3}[ \-]?\d{4}"
        r"|0\d{9,11}",
        _landline,
        context=_context(_PHONE_WORDS),
        bare_only=True,
    ),
    PiiType(
        "us_ssn",
        "SSN",
        r"\d{3}-\d{2}-\d{4}|\d{3} \d{2} \d{4}|\d{9}",
        _by(checks.us_ssn),
        context=_context(r"ssn|social security|社会安全号|社保号"),
        bare_only=True,
    ),
    PiiType(
        "us_phone",
        "PHONE",
        r"(?:\+?1[ .\-]?)?(?:\(\d{3}\)[ .\-]?|\d{3}[ .\-])\d{3}[ .\-]\d{4}|\+1\d{10}|\d{10}",
        _us_phone,
        context=_context(_PHONE_WORDS),
        bare_only=True,
    ),
    PiiType(
        "bank_card",
        "BANK_CARD",
        r"\d{4}(?:[ \-]\d{4}){3}(?:[ \-]?\d{1,3})?|\d{4}[ \-]\d{6}[ \-]\d{4,5}|\d{13,19}",
        _by(checks.bank_card),
    ),
    PiiType("ipv4", "IP", _OCTET + r"(?:\." + _OCTET + r"){3}", _ipv4, labelled=False, not_after=_VERSION),
    PiiType(
        "ipv6",
        "IP",
        r"(?<!:)(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?!:)",
        _ipv6,
        labelled=False,
        lane="ipv6",
    ),
    PiiType(
        "cn_passport",
        "PASSPORT",
        r"E[A-HJ-NP-Z]\d{7}|[EG]\d{8}",
        lambda v, _d: v.upper(),
        context=_context(r"护照|passport|证件|travel document"),
        lane="passport",
    ),
)
BUILTIN_NAMES = tuple(t.name for t in BUILTIN)

@dataclass(frozen=True)
class CustomPattern:
    """A deployment's own type (config: privacy.patterns)."""

    name: str
    pattern: str
    label: str | None = None
    validator: str | None = None  # a name in pii_checks.VALIDATORS, applied to the value's digits
    context: tuple[str, ...] = ()


def custom_type(spec: CustomPattern) -> PiiType:
    validate = checks.VALIDATORS[spec.validator] if spec.validator else None

    def check(value: str, digits: str) -> str | None:
        if validate is not None and not validate("".join(c for c in digits if c.isdigit() or c == "X")):
            return None
        return value

    words = "|".join(re.escape(w) for w in spec.context)
    return PiiType(
        spec.name,
        spec.label or spec.name.upper(),
        spec.pattern,
        check,
        context=_context(words) if words else None,
        labelled=False,
        lane="custom",
    )
