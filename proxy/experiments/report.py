"""The statistics behind `llm-gateway ab-report`: pure functions over per-variant aggregates.

Rates get Wilson 95% intervals and a two-proportion z-test against control; means (feedback,
tokens/s per request) a Student-t interval kept inside the values a mean can take, and Welch's
t-test; percentiles come from log-spaced histogram buckets (20 per decade, so an estimate is within
~6% of the true value) with a distribution-free interval from the binomial ranks. Significance:
p < 0.05. No I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.settings import Settings

Z95 = 1.959963984540054
ALPHA = 0.05
BUCKETS_PER_DECADE = 20
BUCKET_BASE_S = 1e-3  # bucket 0 holds everything up to 1 ms
MAX_BUCKET = 6 * BUCKETS_PER_DECADE  # 1000 s; slower values land in the last bucket


def bucket_of(seconds: float) -> int:
    """The histogram bucket of a duration: bucket i holds (upper(i-1), upper(i)]."""
    if seconds <= BUCKET_BASE_S:
        return 0
    i = math.ceil(math.log10(seconds / BUCKET_BASE_S) * BUCKETS_PER_DECADE - 1e-9)
    return min(i, MAX_BUCKET)


def bucket_upper(i: int) -> float:
    return float(BUCKET_BASE_S * 10 ** (i / BUCKETS_PER_DECADE))


@dataclass
class Aggregate:
    """One variant's totals: counters (n, err, blk, hit, disc, tin, tout, tps_*, fb_*) and histograms."""

    counts: dict[str, float] = field(default_factory=dict)
    lat: dict[int, int] = field(default_factory=dict)
    ttft: dict[int, int] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        kind, _, idx = name.partition(":")
        if idx and kind in ("lat", "ttft") and idx.isdigit():
            hist = self.lat if kind == "lat" else self.ttft
            hist[int(idx)] = hist.get(int(idx), 0) + int(value)
        elif not idx:
            self.counts[name] = self.counts.get(name, 0.0) + value

    def get(self, name: str) -> float:
        return self.counts.get(name, 0.0)


# -- proportions -------------------------------------------------------------------------------------
def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (0..1 bounds; (0, 1) when n is 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_p(k1: float, n1: float, k2: float, n2: float) -> float | None:
    """Two-sided p-value of the pooled two-proportion z-test; None without data on both sides."""
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (k2 / n2 - k1 / n1) / se
    return math.erfc(abs(z) / math.sqrt(2))


# -- means -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Moments:
    n: float
    total: float  # sum of values
    squares: float  # sum of squared values

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n > 0 else None

    @property
    def variance(self) -> float | None:
        """Sample variance (n - 1); None below two values."""
        if self.n < 2:
            return None
        return max(0.0, (self.squares - self.total * self.total / self.n) / (self.n - 1))


Bounds = tuple[float, float]
UNBOUNDED: Bounds = (-math.inf, math.inf)


def mean_interval(m: Moments, bounds: Bounds = UNBOUNDED) -> tuple[float, float] | None:
    """95% Student-t interval of the mean (n - 1 degrees of freedom), cut to `bounds`.

    The t quantile, not the normal one: with the few requests a variant may have, 1.96 makes the
    interval too narrow (n = 5: 2.78). Cutting at what the mean can be (tokens/s >= 0, a feedback
    scale's ends) removes only values the true mean cannot take, so coverage is unchanged; a skewed
    sample (a few very fast short answers) otherwise puts the lower end below zero."""
    if m.mean is None or m.variance is None:
        return None
    half = t_critical(m.n - 1) * math.sqrt(m.variance / m.n)
    low, high = bounds
    return max(low, m.mean - half), min(high, m.mean + half)


def t_critical(df: float) -> float:
    """Student's t two-sided 95% critical value, P(|T| >= t) = 0.05, by bisection on the CDF."""
    if df > 1e6:  # within 1e-6 of the normal value
        return Z95
    low, high = Z95, 2 * Z95
    while student_t_two_sided(high, df) > ALPHA:
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_two_sided(mid, df) > ALPHA else (low, mid)
    return (low + high) / 2


def welch_p(a: Moments, b: Moments) -> float | None:
    """Two-sided p-value of Welch's t-test for a difference of means."""
    if a.variance is None or b.variance is None or a.mean is None or b.mean is None:
        return None
    va, vb = a.variance / a.n, b.variance / b.n
    if va + vb == 0:
        return 1.0 if a.mean == b.mean else 0.0
    t = (b.mean - a.mean) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (a.n - 1) + vb * vb / (b.n - 1))
    return student_t_two_sided(t, df)


def student_t_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    return incomplete_beta(df / 2, 0.5, df / (df + t * t))


def incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1.0 - front * _beta_fraction(b, a, 1 - x) / b
    return front * _beta_fraction(a, b, x) / a


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1) < 1e-14:
            break
    return result


# -- percentiles -------------------------------------------------------------------------------------
def value_at_rank(hist: dict[int, int], rank: float) -> float | None:
    """The value at a (1-based, fractional) rank, interpolated log-linearly inside its bucket."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = min(max(rank, 0.0), float(total))
    seen = 0
    for i in sorted(hist):
        count = hist[i]
        if count and seen + count >= rank:
            frac = (rank - seen) / count
            hi = bucket_upper(i)
            if i == 0:
                return hi * frac
            lo = bucket_upper(i - 1)
            return float(lo * (hi / lo) ** frac)
        seen += count
    return bucket_upper(max(hist))


def quantile(hist: dict[int, int], q: float) -> tuple[float, float, float] | None:
    """(estimate, low, high) of the q-quantile; the interval spans ranks n*q -/+ 1.96*sqrt(n*q*(1-q))."""
    n = sum(hist.values())
    if n == 0:
        return None
    half = Z95 * math.sqrt(n * q * (1 - q))
    estimate = value_at_rank(hist, n * q)
    low, high = value_at_rank(hist, n * q - half), value_at_rank(hist, n * q + half)
    assert estimate is not None and low is not None and high is not None
    return estimate, low, high


# -- the report ----------------------------------------------------------------------------------------
RATES = (("error_rate", "err"), ("block_rate", "blk"), ("cache_hit_rate", "hit"), ("disconnect_rate", "disc"))
MEANS = (("tokens_per_s", "tps"), ("feedback", "fb"))
FEEDBACK_SCALES: dict[str, Bounds] = {"thumbs": (-1.0, 1.0), "stars": (0.0, 5.0)}


def feedback_range(scale: str) -> Bounds:
    """The scores a feedback scale allows (observability.feedback_scale)."""
    return FEEDBACK_SCALES[scale]


PERCENTILES = (("ttft", "ttft"), ("latency", "lat"))


def variant_stats(agg: Aggregate, control: Aggregate | None, feedback: Bounds = UNBOUNDED) -> dict[str, Any]:
    """Every figure for one variant; `control` None means this variant is the control."""
    bounds = {"tokens_per_s": (0.0, math.inf), "feedback": feedback}
    n = agg.get("n")
    out: dict[str, Any] = {
        "requests": int(n),
        "tokens_in": int(agg.get("tin")),
        "tokens_out": int(agg.get("tout")),
    }
    for name, key in RATES:
        low, high = wilson(agg.get(key), n)
        entry: dict[str, Any] = {
            "count": int(agg.get(key)),
            "rate": agg.get(key) / n if n else None,
            "ci": [low, high],
        }
        if control is not None:
            entry["p"] = two_proportion_p(control.get(key), control.get("n"), agg.get(key), n)
        out[name] = _with_verdict(entry)
    for name, key in MEANS:
        m = _moments(agg, key)
        entry = {"n": int(m.n), "mean": m.mean, "ci": mean_interval(m, bounds[name])}
        if control is not None:
            entry["p"] = welch_p(_moments(control, key), m)
        out[name] = _with_verdict(entry)
    for name, attr in PERCENTILES:
        hist = getattr(agg, attr)
        out[name] = {
            "n": sum(hist.values()),
            **{f"p{int(q * 100)}": quantile(hist, q) for q in (0.5, 0.95)},
            "histogram": histogram(hist),
        }
    return out


def histogram(hist: dict[int, int]) -> list[list[float]]:
    """The non-empty buckets, fastest first, as [lower_s, upper_s, count]: the distribution itself."""
    return [[bucket_upper(i - 1) if i else 0.0, bucket_upper(i), hist[i]] for i in sorted(hist) if hist[i]]


def _moments(agg: Aggregate, key: str) -> Moments:
    return Moments(agg.get(f"{key}_n"), agg.get(f"{key}_s"), agg.get(f"{key}_q"))


def _with_verdict(entry: dict[str, Any]) -> dict[str, Any]:
    if "p" in entry:
        entry["significant"] = entry["p"] is not None and entry["p"] < ALPHA
    return entry


def experiment_report(
    variants: dict[str, Aggregate], control: str, feedback: Bounds = UNBOUNDED
) -> dict[str, Any]:
    """{control, variants: {name: stats}}; the control's own stats carry no p-values."""
    base = variants.get(control)
    return {
        "control": control,
        "variants": {
            name: variant_stats(agg, None if name == control else base, feedback)
            for name, agg in variants.items()
        },
    }


def control_of(variants: list[str]) -> str:
    """The variant named 'control', else the first one configured."""
    return "control" if "control" in variants else variants[0]


def build_reports(
    configured: Mapping[str, list[str]],
    data: Mapping[str, Mapping[str, Aggregate]],
    model: str | None,
    *,
    include_all: bool = False,
    feedback: Bounds = UNBOUNDED,
) -> dict[str, Any]:
    """One report per experiment (`configured`: model -> its variants, in config order), with the
    configured variants only; `include_all` adds the models and variants seen in `data` that the
    config no longer has (old experiments, other deployments sharing the Redis prefix)."""
    names = [model] if model else [*configured, *(m for m in data if include_all and m not in configured)]
    reports: dict[str, Any] = {}
    for name in names:
        seen = data.get(name, {})
        order = list(configured.get(name, ()))
        if include_all:
            order += sorted(v for v in seen if v not in order)
        if order:
            variants = {v: seen.get(v, Aggregate()) for v in order}
            reports[name] = experiment_report(variants, control_of(order), feedback)
    return reports


def report_document(
    settings: Settings,
    data: Mapping[str, Mapping[str, Aggregate]],
    window_s: int,
    model: str | None = None,
    *,
    include_all: bool = False,
) -> dict[str, Any]:
    """What `ab-report --json` prints and the console's /console/api/experiments returns (one
    function, so the two cannot disagree): {window_s, experiments: {model: report}}."""
    configured = {name: [v.name for v in m.variants] for name, m in settings.models.items()}
    feedback = feedback_range(settings.observability.feedback_scale)
    reports = build_reports(configured, data, model, include_all=include_all, feedback=feedback)
    return {"window_s": window_s, "experiments": reports}


# -- rendering ---------------------------------------------------------------------------------------
def _pct(entry: dict[str, Any]) -> str:
    if entry["rate"] is None:
        return "-"
    low, high = entry["ci"]
    return f"{entry['rate']:.2%} [{low:.2%}, {high:.2%}]"


def _ms(v: float) -> str:
    return f"{v * 1000:.0f}" if v >= 0.0995 else f"{v * 1000:.1f}"


def _quantile_cell(value: tuple[float, float, float] | None) -> str:
    if value is None:
        return "-"
    est, low, high = value
    return f"{_ms(est)} ms [{_ms(low)}, {_ms(high)}]"


def _mean_cell(entry: dict[str, Any]) -> str:
    if entry["mean"] is None:
        return "-"
    ci = entry["ci"]
    spread = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    return f"{entry['mean']:.2f}{spread} n={entry['n']}"


def _verdict(entry: dict[str, Any]) -> str:
    p = entry.get("p")
    if p is None:
        return ""
    shown = "p<0.001" if p < 0.001 else f"p={p:.3f}"
    return f"  {shown}{' *' if entry['significant'] else ''}"


def _rows(stats: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("requests", str(stats["requests"]))]
    for name, label in (
        ("error_rate", "error rate"),
        ("block_rate", "policy-block rate"),
        ("cache_hit_rate", "cache-hit rate"),
        ("disconnect_rate", "disconnect rate"),
    ):
        rows.append((label, _pct(stats[name]) + _verdict(stats[name])))
    for name, label in (("ttft", "TTFT"), ("latency", "latency")):
        for q in ("p50", "p95"):
            rows.append((f"{label} {q}", _quantile_cell(stats[name][q])))
    for name, label in (("tokens_per_s", "tokens/s"), ("feedback", "feedback")):
        rows.append((label, _mean_cell(stats[name]) + _verdict(stats[name])))
    rows.append(("tokens in/out", f"{stats['tokens_in']}/{stats['tokens_out']}"))
    return rows


def render_text(reports: dict[str, dict[str, Any]], window: str) -> str:
    """A readable table per experiment: one column per variant, control first."""
    out: list[str] = []
    for model, rep in reports.items():
        names = list(rep["variants"])
        out.append(f"{model}  (last {window}; control: {rep['control']}; * = differs from control, p < 0.05)")
        if not names:
            out.extend(["  no data", ""])
            continue
        columns = [_rows(rep["variants"][n]) for n in names]
        labels = [label for label, _ in columns[0]]
        widths = [max(len(n), *(len(cell) for _, cell in col)) for n, col in zip(names, columns, strict=True)]
        out.append("  " + " " * 18 + "  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)))
        for i, label in enumerate(labels):
            cells = "  ".join(col[i][1].ljust(w) for col, w in zip(columns, widths, strict=True))
            out.append(f"  {label:<18}{cells}".rstrip())
        out.append("")
    return "\n".join(out)
