"""The template guard (proxy/cache_semantic.TemplateGuard): template text every recent turn shares is
not embedded; questions that merely open alike keep all their words."""

from __future__ import annotations

import random

from loadtest.prompts import POPULAR, PromptBook
from proxy.cache.semantic import TemplateGuard

WRAP = (
    "You are the support assistant of ACME Cloud. Answer politely, in the customer's language, "
    "and never promise refunds.\nCustomer question: {q}\nAnswer in at most three sentences."
)
QUESTIONS = [f"How do I change the billing address of account {i}?" for i in range(12)]


def test_a_shared_wrapper_is_learned_and_left_out() -> None:
    guard = TemplateGuard()
    first = guard.split("p", WRAP.format(q=QUESTIONS[0]))
    assert first.text == WRAP.format(q=QUESTIONS[0]) and first.template == ""  # nothing learned yet
    for q in QUESTIONS[1:9]:
        guard.split("p", WRAP.format(q=q))
    own = guard.split("p", WRAP.format(q="Where can I download my invoices?"))
    assert own.text == "Where can I download my invoices?"
    assert own.template.startswith("You are the support assistant") and "three sentences" in own.template


def test_the_wrapper_is_per_partition_and_names_the_partition() -> None:
    guard = TemplateGuard()
    for q in QUESTIONS[:9]:
        guard.split("p", WRAP.format(q=q))
    other = WRAP.replace("ACME Cloud", "Globex Mail")
    assert guard.split("q", other.format(q=QUESTIONS[0])).template == ""  # another partition learns alone
    a = guard.split("p", WRAP.format(q="Why was I charged twice?"))
    for q in QUESTIONS[:9]:
        guard.split("p2", other.format(q=q))
    b = guard.split("p2", other.format(q="Why was I charged twice?"))
    assert a.text == b.text and a.template != b.template  # same question, other template: other partition


def test_a_prefix_shared_by_a_minority_is_not_a_template() -> None:
    guard = TemplateGuard()
    texts = [WRAP.format(q=q) for q in QUESTIONS[:6]] + [
        f"Plain question {i} about storage tiers" for i in range(4)
    ]
    for t in texts:
        guard.split("p", t)
    own = guard.split("p", WRAP.format(q="Where can I download my invoices?"))
    assert own.template == ""  # 6 of 10 is below the 80% share


def test_load_test_questions_keep_every_word() -> None:
    guard, book = TemplateGuard(), PromptBook(random.Random(3))
    asked = (
        [book.fresh() for _ in range(200)] + [q for q, _ in POPULAR] + [p for _, ps in POPULAR for p in ps]
    )
    random.Random(4).shuffle(asked)
    stripped = [t for t in asked if guard.split("p", t).template]
    assert stripped == []


def test_memory_is_bounded_by_partitions_and_recent_turns() -> None:
    guard = TemplateGuard(recent=4, partitions=3)
    for p in range(10):
        for i in range(10):
            guard.split(f"p{p}", "x" * 5000 + str(i))
    assert len(guard._rings) == 3 and all(len(r) == 4 for r in guard._rings.values())
    assert all(len(h) <= 1024 and len(t) <= 1024 for r in guard._rings.values() for h, t in r)
