"""The personal-data recognizers (policies/pii.py) and their checks (policies/pii_checks.py)."""

from __future__ import annotations

import random
from typing import get_args

import pytest
from stdnum import luhn as stdnum_luhn
from stdnum.cn import ric
from stdnum.us import ssn

from loadtest import pii_eval
from policies import pii_checks as checks
from policies.pii import BUILTIN_NAMES, CustomPattern, Recognizer
from proxy.settings import PiiTypeName, PiiValidator

R = Recognizer()


def kinds(text: str, recognizer: Recognizer = R) -> list[tuple[str, str]]:
    return [(f.kind, f.value) for f in recognizer.find(text)]


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("身份证11010519491231002X。", "cn_resident_id", "11010519491231002X"),
        ("ID 11010519491231002x ok", "cn_resident_id", "11010519491231002x"),
        ("号码 110105 19491231 002X", "cn_resident_id", "110105 19491231 002X"),
        ("手机13812345678，", "cn_mobile", "13812345678"),
        ("call +86 138 1234 5678 now", "cn_mobile", "+86 138 1234 5678"),
        ("tel:(+86)199-1234-5678", "cn_mobile", "(+86)199-1234-5678"),
        ("电话１３８１２３４５６７８。", "cn_mobile", "１３８１２３４５６７８"),
        ("座机010-62345678", "cn_landline", "010-62345678"),
        ("(0755)2345-6789 转 8", "cn_landline", "(0755)2345-6789"),
        ("dial +86 10 62345678", "cn_landline", "+86 10 62345678"),
        ("电话 01062345678", "cn_landline", "01062345678"),
        ("SSN 536-90-4399.", "us_ssn", "536-90-4399"),
        ("social security 536904399", "us_ssn", "536904399"),
        ("call (212) 555-2368 today", "us_phone", "(212) 555-2368"),
        ("cell +1 415.555.2671", "us_phone", "+1 415.555.2671"),
        ("phone 2125552368", "us_phone", "2125552368"),
        ("card 4111 1111 1111 1111", "bank_card", "4111 1111 1111 1111"),
        ("卡号6222020200112233446的卡", "bank_card", "6222020200112233446"),
        ("amex 3782-822463-10005", "bank_card", "3782-822463-10005"),
        ("mail John.Smith+tag@Example.COM.", "email", "John.Smith+tag@Example.COM"),
        ("邮箱12345678@qq.com谢谢", "email", "12345678@qq.com"),
        ("from 203.0.113.7 at night", "ipv4", "203.0.113.7"),
        ("LAN 192.168.1.10", "ipv4", "192.168.1.10"),
        ("via 2408:8207:1850::1 ok", "ipv6", "2408:8207:1850::1"),
        ("护照号码E12345678", "cn_passport", "E12345678"),
        ("passport: EA1234567", "cn_passport", "EA1234567"),
        ("G12345678 是我的护照", "cn_passport", "G12345678"),
    ],
)
def test_each_type_in_its_written_forms(text: str, kind: str, value: str) -> None:
    assert kinds(text) == [(kind, value)]


@pytest.mark.parametrize(
    "text",
    [
        "order 138123456789",  # a longer digit run
        "SN-13812345678",  # joined to a token by a hyphen
        "ab13812345678",  # glued to letters
        "13812345678.5",  # a decimal
        "12345678901 and 15412345678",  # prefixes no carrier has
        "11010519491231002Y",  # not a check character
        "110105194912310021",  # wrong check digit
        "110105194902300020",  # 30 February
        "999999199001011234",  # no such county
        "4111 1111 1111 1112",  # Luhn fails
        "1234567890123452",  # passes Luhn, no card network starts with 1
        "订单号 4111111111111111",  # an order number, says its label
        "000-12-3456 666-12-3456 900-12-3456 123-00-4567 123-45-0000 078-05-1120",  # SSN rules
        "(111) 555-1234 (212) 111-1234 (290) 555-1234",  # NANP: area/exchange N11, 1XX, N9X
        "hotline 400-820-8820 800-810-8888",  # N00 service numbers
        "2125552368 5369043991",  # bare US number / SSN without a context word
        "01062345678",  # bare landline without a context word
        "E12345678",  # passport shape without a context word
        "version 1.2.3.4, section 4.1.1.2, 版本 2.10.4.1",  # dotted quads that are versions
        "127.0.0.1 0.0.0.0 169.254.169.254 ::1 224.0.0.1",  # no one's address
        "10:30:45 00:1A:2B:3C:4D:5E 3:2:1 std::vector",  # times, MAC, ratios, code
        "user@localhost @mention numpy@1.26.4 a..b@x.com",  # not addresses
        "2023-11-05 14:30:00 1699171200123 ￥13,800.00",  # dates, timestamps, prices
    ],
)
def test_near_misses_are_not_taken(text: str) -> None:
    assert kinds(text) == []


def test_an_18_digit_card_that_is_no_id_is_a_card() -> None:
    body = "62" + "1" * 15
    card = body + stdnum_luhn.calc_check_digit(body)
    assert len(card) == 18 and not checks.cn_resident_id(card)
    assert kinds(f"卡 {card}") == [("bank_card", card)]


def test_values_are_found_left_to_right_and_normalized() -> None:
    found = R.find("A 138-1234-5678, B +86 13812345678, C a@B.com")
    assert [f.kind for f in found] == ["cn_mobile", "cn_mobile", "email"]
    assert found[0].key == found[1].key == "13812345678"  # one value, two spellings
    assert found[2].key == "a@b.com"


def test_types_can_be_switched_off() -> None:
    only = Recognizer(types=["email"])
    assert kinds("a@b.com 13812345678", only) == [("email", "a@b.com")]
    assert kinds("13812345678", Recognizer(types=[])) == []


def test_custom_patterns_with_a_validator_and_context_come_first() -> None:
    custom = [
        CustomPattern("employee", r"EMP\d{6}", context=("工号", "employee")),
        CustomPattern("member_card", r"\d{16}", label="MEMBER", validator="luhn"),
    ]
    r = Recognizer(custom=custom)
    assert kinds("工号 EMP123456", r) == [("employee", "EMP123456")]
    assert kinds("EMP123456", r) == []  # no context word
    assert kinds("会员 1234567890123452", r) == [("member_card", "1234567890123452")]
    assert kinds("会员 1234567890123453", r) == []  # Luhn fails
    assert r.labels["member_card"] == "MEMBER" and r.labels["employee"] == "EMPLOYEE"
    assert kinds("EMP123456", r) == [] and kinds("no digits here", r) == []  # scanned without a digit


def test_settings_name_the_same_types_and_validators() -> None:
    assert set(get_args(PiiTypeName)) == set(BUILTIN_NAMES)
    assert set(get_args(PiiValidator)) == set(checks.VALIDATORS)


def test_checks_agree_with_python_stdnum() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(13, 19)))
        assert checks.luhn(digits) == stdnum_luhn.is_valid(digits)
        nine = digits[:9]
        assert checks.us_ssn(nine) == ssn.is_valid(nine), nine
    for _ in range(2000):
        number = "".join(rng.choice("0123456789") for _ in range(17))
        number += ric.calc_check_digit(number + "0") if rng.random() < 0.5 else rng.choice("0123456789X")
        assert checks.iso7064_mod11_2(number) == (ric.calc_check_digit(number) == number[17])


def test_the_corpus_meets_the_targets() -> None:
    rows = pii_eval.load(pii_eval.CORPUS)
    assert len(rows) >= 300 and {r["lang"] for r in rows} == {"zh", "en"}
    result = pii_eval.score(rows, Recognizer())
    assert result["near_fp"] == 0, result["mistakes"]
    found, missed = sum(result["tp"].values()), sum(result["fn"].values())
    assert found / (found + missed) >= pii_eval.RECALL_TARGET, result["mistakes"]
    assert all(result["tp"][kind] >= 10 for kind in BUILTIN_NAMES)  # every type is exercised
