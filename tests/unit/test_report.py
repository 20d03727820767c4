"""The A/B statistics against hand computations and published table values."""

from __future__ import annotations

import math

import pytest

from proxy.experiments.report import (
    Aggregate,
    Moments,
    bucket_of,
    bucket_upper,
    build_reports,
    experiment_report,
    feedback_range,
    incomplete_beta,
    mean_interval,
    quantile,
    render_text,
    student_t_two_sided,
    t_critical,
    two_proportion_p,
    value_at_rank,
    welch_p,
    wilson,
)

Z = 1.959963984540054


def _moments(values: list[float]) -> Moments:
    return Moments(len(values), sum(values), sum(v * v for v in values))


# -- Wilson --------------------------------------------------------------------------------------------
def test_wilson_10_of_100_matches_the_hand_computation() -> None:
    # p = 0.1, z^2/n = 0.038415; centre = (0.1 + 0.0192073) / 1.038415 = 0.114797
    # half = 1.96 * sqrt(0.0009 + 0.0000960365) / 1.038415 = 0.0618564 / 1.038415 = 0.059568
    low, high = wilson(10, 100)
    assert low == pytest.approx(0.114797 - 0.059568, abs=2e-6)
    assert high == pytest.approx(0.114797 + 0.059568, abs=2e-6)
    assert (round(low, 4), round(high, 4)) == (0.0552, 0.1744)  # the published table value


def test_wilson_edges() -> None:
    low, high = wilson(0, 20)
    assert low == 0 and high == pytest.approx(Z * Z / (20 + Z * Z))  # 0 successes: z^2 / (n + z^2)
    low, high = wilson(20, 20)
    assert high == 1 and low == pytest.approx(20 / (20 + Z * Z))
    assert wilson(0, 0) == (0.0, 1.0)


# -- two proportions -------------------------------------------------------------------------------------
def test_two_proportion_z_test_by_hand() -> None:
    # pooled = 30/200 = 0.15; se = sqrt(0.15 * 0.85 * (1/100 + 1/100)) = 0.0504975; z = 0.1 / se = 1.98030
    p = two_proportion_p(10, 100, 20, 100)
    assert p == pytest.approx(math.erfc(1.98030 / math.sqrt(2)), abs=1e-5)
    assert p == pytest.approx(0.0477, abs=1e-4)
    assert two_proportion_p(20, 100, 10, 100) == p  # two-sided: symmetric


def test_two_proportion_degenerate_cases() -> None:
    assert two_proportion_p(0, 50, 0, 80) == 1.0  # no variance at all: no evidence of a difference
    assert two_proportion_p(5, 50, 8, 80) == pytest.approx(1.0)  # equal rates
    assert two_proportion_p(1, 0, 1, 10) is None


# -- Student's t and Welch ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("t", "df", "p"),
    [
        (12.706, 1, 0.05),  # t-table critical values, two-sided
        (2.228, 10, 0.05),
        (3.169, 10, 0.01),
        (2.0, 10, 0.07339),
        (1.96, 1e7, 0.05),  # the normal limit
        (0.0, 5, 1.0),
    ],
)
def test_student_t_against_table_values(t: float, df: float, p: float) -> None:
    assert student_t_two_sided(t, df) == pytest.approx(p, abs=2e-4)


def test_incomplete_beta_known_values() -> None:
    assert incomplete_beta(1, 1, 0.3) == pytest.approx(0.3)  # the uniform distribution
    assert incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248)  # 1 - sum_{k<2} C(4,k) .4^k .6^(4-k)
    assert incomplete_beta(5, 5, 0.5) == pytest.approx(0.5)


def _t_tail_by_integration(t: float, df: float, steps: int = 20000) -> float:
    """Two-sided tail of Student's t by Simpson's rule over the density: an independent check."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    h = abs(t) / steps
    total = sum(
        (1 if i in (0, steps) else 4 if i % 2 else 2) * c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2)
        for i in range(steps + 1)
    )
    return 1 - 2 * total * h / 3


def test_welch_by_hand() -> None:
    a, b = _moments([1, 2, 3, 4, 5]), _moments([2, 4, 6, 8, 10])
    # means 3 and 6; variances 2.5 and 10; se = sqrt(2.5/5 + 10/5) = 1.58114; t = 3 / se = 1.89737
    # df = 2.5^2 / (0.5^2/4 + 2^2/4) = 6.25 / 1.0625 = 5.88235
    p = welch_p(a, b)
    assert p == pytest.approx(_t_tail_by_integration(1.89737, 5.88235), abs=1e-4)
    assert 0.10 < p < 0.11
    assert welch_p(b, a) == pytest.approx(p)
    assert welch_p(_moments([1.0]), b) is None


@pytest.mark.parametrize(
    ("df", "published"),  # two-sided 95% critical values of Student's t (any statistics table)
    [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423), (120, 1.9799), (1e7, 1.9600)],
)
def test_t_critical_matches_the_table(df: float, published: float) -> None:
    assert t_critical(df) == pytest.approx(published, abs=1e-4)


def test_mean_interval_by_hand() -> None:
    m = _moments([1, 2, 3, 4, 5])
    assert m.mean == 3 and m.variance == pytest.approx(2.5)
    low, high = mean_interval(m)  # 3 -/+ t(0.975, 4 df) * sqrt(2.5 / 5) = 3 -/+ 2.7764 * 0.70711
    assert (low, high) == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-4)
    assert mean_interval(_moments([4.0])) is None


def test_mean_interval_of_a_skewed_rate_stays_possible() -> None:
    # tokens/s of three answers: two long ones and one 2-token answer in 1 ms (the shape behind an
    # interval like "1067.59 [-68.76, 2203.93]"): a mean of rates cannot be negative
    m = _moments([40.0, 55.0, 2000.0])
    low, high = mean_interval(m, (0.0, math.inf))
    half = 4.3027 * math.sqrt(m.variance / 3)  # t on 2 df, wider than 1.96 would make it
    assert low == 0.0 and high == pytest.approx(m.mean + half, rel=1e-4)
    assert mean_interval(m)[0] < 0  # unbounded, the same sample reaches below zero
    low, high = mean_interval(_moments([1.0, 1.0, 0.9, 1.0]), (-1.0, 1.0))  # a thumbs feedback mean
    assert high == 1.0 and -1.0 <= low < 1.0


def test_feedback_interval_is_cut_to_the_scale() -> None:
    fb = _agg(n=3, fb_n=3, fb_s=3.0 + 3.0 + 4.0, fb_q=9.0 + 9.0 + 16.0, tps_n=2, tps_s=11.0, tps_q=101.0)
    stats = experiment_report({"control": fb}, "control", feedback_range("stars"))["variants"]["control"]
    low, high = stats["feedback"]["ci"]
    assert 0.0 <= low and high <= 5.0
    tps = stats["tokens_per_s"]["ci"]  # values 1 and 10 on 1 df: 5.5 -/+ 12.706 * 4.5
    assert tps == pytest.approx([0.0, 5.5 + 12.7062 * 4.5], abs=1e-3)


# -- histogram percentiles ---------------------------------------------------------------------------------
def test_buckets_are_log_spaced_20_per_decade() -> None:
    assert bucket_of(0.0) == 0 and bucket_of(0.001) == 0
    assert bucket_of(0.0010001) == 1
    assert bucket_of(0.01) == 20 and bucket_of(0.0101) == 21
    assert bucket_of(1.0) == 60 and bucket_of(1e6) == 120
    assert bucket_upper(20) == pytest.approx(0.01) and bucket_upper(60) == pytest.approx(1.0)
    for v in (0.0013, 0.042, 0.77, 3.3, 71.0):  # every value lies inside its bucket
        i = bucket_of(v)
        assert bucket_upper(i - 1) < v <= bucket_upper(i) * (1 + 1e-12)


def test_quantiles_from_buckets_by_hand() -> None:
    hist = {20: 50, 40: 50}  # 50 values in (8.9, 10] ms, 50 in (89.1, 100] ms
    p50, low50, high50 = quantile(hist, 0.5)
    assert p50 == pytest.approx(0.01)  # rank 50 is the top of the first bucket
    p95, low95, high95 = quantile(hist, 0.95)
    lo = bucket_upper(39)  # rank 95 is 45/50 = 0.9 of the way through bucket 40, log-linearly
    assert p95 == pytest.approx(lo * (0.1 / lo) ** 0.9)
    half = Z * math.sqrt(100 * 0.95 * 0.05)  # ranks 95 -/+ 4.27
    assert low95 == pytest.approx(lo * (0.1 / lo) ** ((95 - half - 50) / 50))
    assert high95 == pytest.approx(lo * (0.1 / lo) ** ((95 + half - 50) / 50))
    assert low50 < p50 < high50
    assert quantile({}, 0.5) is None
    assert value_at_rank({0: 4}, 2) == pytest.approx(0.0005)  # bucket 0 is linear from 0


# -- a seeded experiment -----------------------------------------------------------------------------------
def _agg(**counts: float) -> Aggregate:
    agg = Aggregate()
    for name, value in counts.items():
        agg.add(name.replace("__", ":"), value)
    return agg


def test_experiment_report_on_seeded_aggregates() -> None:
    control = _agg(
        n=1000,
        err=10,
        blk=5,
        hit=100,
        lat__40=900,
        ttft__30=900,
        fb_n=4,
        fb_s=2.0,
        fb_q=2.0,
        tps_n=3,
        tps_s=60,
        tps_q=1208,
    )
    candidate = _agg(
        n=1000,
        err=25,
        blk=5,
        hit=100,
        lat__44=900,
        ttft__30=900,
        fb_n=4,
        fb_s=4.0,
        fb_q=4.0,
        tps_n=3,
        tps_s=90,
        tps_q=2708,
    )
    rep = experiment_report({"control": control, "candidate": candidate}, "control")
    assert rep["control"] == "control"
    c, d = rep["variants"]["control"], rep["variants"]["candidate"]
    assert c["requests"] == 1000 and "p" not in c["error_rate"]
    assert c["error_rate"]["rate"] == 0.01 and c["error_rate"]["ci"] == list(wilson(10, 1000))
    # pooled 35/2000 = 0.0175; se = sqrt(0.0175 * 0.9825 * 0.002) = 0.0058641; z = 0.015 / se = 2.5579
    assert d["error_rate"]["p"] == pytest.approx(math.erfc(2.5579 / math.sqrt(2)), abs=1e-4)
    assert d["error_rate"]["significant"] is True
    assert d["block_rate"]["p"] == pytest.approx(1.0) and d["block_rate"]["significant"] is False
    # tokens/s: control values 18, 20, 22 (mean 20, var 4); candidate 28, 30, 32 (mean 30, var 4)
    assert c["tokens_per_s"]["mean"] == 20 and d["tokens_per_s"]["mean"] == 30
    assert d["tokens_per_s"]["significant"] is True  # t = 10 / sqrt(8/3) = 6.12 on 4 df
    assert d["feedback"]["mean"] == 1.0 and c["feedback"]["mean"] == 0.5
    assert d["latency"]["p50"][0] == pytest.approx(value_at_rank({44: 900}, 450))
    assert d["ttft"]["n"] == 900


def test_render_text_marks_significant_differences() -> None:
    rep = experiment_report({"control": _agg(n=1000, err=10), "b": _agg(n=1000, err=40)}, "control")
    text = render_text({"assistant": rep}, "1h")
    lines = text.splitlines()
    assert lines[0].startswith("assistant  (last 1h; control: control")
    error_line = next(line for line in lines if line.strip().startswith("error rate"))
    assert "1.00% [0.54%, 1.83%]" in error_line and error_line.endswith("*")
    assert "p<0.001" in error_line
    assert any(line.strip().startswith("requests") and "1000" in line for line in lines)


# -- which experiments are reported ---------------------------------------------------------------------
def test_reports_show_only_configured_models_and_variants_unless_all() -> None:
    configured = {"assistant": ["control", "candidate"], "new": ["control"]}
    data = {
        "assistant": {"control": _agg(n=5), "candidate": _agg(n=4), "left-by-tests": _agg(n=9)},
        "retired": {"control": _agg(n=7)},
    }
    reports = build_reports(configured, data, None)
    assert list(reports) == ["assistant", "new"]
    assert list(reports["assistant"]["variants"]) == ["control", "candidate"]
    assert reports["new"]["variants"]["control"]["requests"] == 0  # configured, no traffic yet
    everything = build_reports(configured, data, None, include_all=True)
    assert list(everything) == ["assistant", "new", "retired"]
    assert list(everything["assistant"]["variants"]) == ["control", "candidate", "left-by-tests"]
    assert list(build_reports(configured, data, "assistant")) == ["assistant"]
    assert build_reports(configured, data, "retired") == {}
    assert list(build_reports(configured, data, "retired", include_all=True)["retired"]["variants"]) == ["control"]
