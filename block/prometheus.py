"""Prometheus metrics through ``prometheus_client``: each service's own registry, and one reader of ``/metrics``.

A service keeps its numbers in plain attributes (counters it bumps, histograms it observes) and describes
them in one function that returns ``Sample`` tuples; ``Exposition`` registers that function as the one
collector of a ``CollectorRegistry`` of the service's own (no process-global state, so several services
live in one test process) and prometheus_client writes the text: one ``# HELP``/``# TYPE`` per family
whatever its label sets, escaping, ``_total`` on counters. The side-car reads engines' ``/metrics``
(the emulator's or a real vLLM's) with prometheus_client's parser, which knows the metric types.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import accumulate

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes, as vLLM serves it

# The workbench's own latencies (routing decisions, predictions): milliseconds to tens of seconds.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so a dashboard or a quantile query reads the
# emulator's histograms exactly as a real engine's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)  # vllm:time_per_output_token_seconds, vllm:inter_token_latency_seconds
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)  # vllm:e2e_request_latency_seconds


class Histogram:
    """Observations counted into fixed buckets until a scrape turns them into a histogram family.

    prometheus_client's own Histogram needs its name, labels and registry when it is made; a service here
    names its metrics where it describes them (the emulator learns its model label only when served).
    """

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        if list(self.buckets) != sorted(set(self.buckets)) or not self.buckets:
            raise ValueError(f"histogram buckets must be increasing and distinct, got {self.buckets}")
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, observations <= le) pairs, as the exposition format wants them."""
        edges = [*(repr(float(b)) for b in self.buckets), "+Inf"]
        return list(zip(edges, accumulate(self.counts), strict=True))


Labels = Mapping[str, str]
Sample = tuple[str, str, str, Labels, "float | Histogram"]  # (name, "gauge"/"counter"/"histogram", help, labels, value)


def families(samples: Iterable[Sample]) -> list[Metric]:
    """``Sample`` tuples grouped into one family per metric name, in first-seen order. A name given two
    types or two label-name sets is a programming error, refused here rather than exported ambiguously."""
    out: dict[str, Metric] = {}
    shapes: dict[str, tuple[str, list[str]]] = {}
    for name, kind, help_text, labels, value in samples:
        keys = sorted(labels)
        if name not in out:
            out[name], shapes[name] = _family(name, kind, help_text, keys), (kind, keys)
        elif shapes[name] != (kind, keys):
            raise ValueError(f"metric {name}: described twice with different types or label names")
        values = [str(labels[k]) for k in keys]
        if kind == "histogram":
            if not isinstance(value, Histogram):
                raise TypeError(f"metric {name}: a histogram needs a Histogram, got {type(value).__name__}")
            out[name].add_metric(values, value.cumulative(), value.sum)
        else:
            out[name].add_metric(values, float(value))  # type: ignore[arg-type]
    return list(out.values())


def _family(name: str, kind: str, help_text: str, keys: list[str]) -> Metric:
    makers = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily, "histogram": HistogramMetricFamily}
    if kind not in makers:
        raise ValueError(f"metric {name}: unknown type {kind!r}; known: {', '.join(makers)}")
    return makers[kind](name, help_text, labels=keys)


class _Described(Collector):
    """Not named ``describe``: the registry would take such an attribute for the Collector protocol's."""

    def __init__(self, samples: Callable[[], Iterable[Sample]]):
        self._samples = samples

    def collect(self) -> Iterator[Metric]:
        return iter(families(self._samples()))


class Exposition:
    """A service's ``/metrics``: its own CollectorRegistry, whose one collector asks the service to
    describe its current numbers at scrape time."""

    def __init__(self, describe: Callable[[], Iterable[Sample]]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Described(describe))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_families(text: str) -> dict[str, Metric]:
    """Every family in a ``/metrics`` text by family name (a counter's without ``_total``), parsed by
    prometheus_client: types, label escapes and sample timestamps as the format defines them."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def _samples_named(text: str, keep: Callable[[str], bool]) -> str:
    """``text`` with only the sample lines whose metric name passes ``keep`` (comments stay). Histogram
    buckets are most of an engine's exposition and most of the parsing time; a reader that wants none of
    them drops them before prometheus_client's parser sees the rest."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if line.startswith("#") or keep(line.split("{", 1)[0].split(" ", 1)[0]))


def parse_metrics(text: str) -> dict[str, float]:
    """One number per sample name, combined across label sets (engines, finish reasons) by metric type.

    Counters and histogram/summary ``_sum``/``_count`` add up: a total over engines is the instance's total.
    A gauge is a level, not an amount, so it is never summed: the highest value across label sets is
    kept, the busiest engine's, which is what a side-car that simulates one engine's scheduler compares
    with (two engines at 60% KV usage are not one at 120%). Buckets and ``_created`` samples are left out.
    A malformed text is a ValueError.
    """
    values: dict[str, float] = {}
    kept = _samples_named(text, lambda name: not name.endswith(("_bucket", "_created")))
    for family in text_string_to_metric_families(kept):
        for s in family.samples:
            if family.type in ("gauge", "unknown", "info", "stateset"):
                values[s.name] = max(values.get(s.name, s.value), s.value)
            else:
                values[s.name] = values.get(s.name, 0.0) + s.value
    return values


def parse_label(text: str, metric: str, label: str) -> str | None:
    """The value of ``label`` on the first sample of ``metric`` (e.g. vLLM's cache_config_info)."""
    for family in text_string_to_metric_families(_samples_named(text, lambda name: name == metric)):
        for s in family.samples:
            if s.name == metric and label in s.labels:
                return s.labels[label]
    return None


def sample_value(text: str, name: str, labels: Labels | None = None) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels`` (None when there is none): how a
    test or a tool reads one series of a ``/metrics`` text without matching its formatting."""
    want = dict(labels or {})
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and want.items() <= s.labels.items():
                return s.value
    return None
