"""Prometheus text exposition, written and read by hand: a few gauges, counters and histograms.

Services keep their own small registries (no process-global state), so several can live in one
process during tests; the side-car reads engines' ``/metrics`` with ``parse_metrics``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


class Histogram:
    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, labels: str) -> list[str]:
        lines, cumulative = [], 0
        sep = "," if labels else ""
        for edge, n in zip(self.buckets, self.counts, strict=False):
            cumulative += n
            lines.append(f'{name}_bucket{{{labels}{sep}le="{edge}"}} {cumulative}')
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum{{{labels}}} {self.sum}")
        lines.append(f"{name}_count{{{labels}}} {self.count}")
        return lines


def render(metrics: list[tuple[str, str, str, str, object]]) -> str:
    """metrics: (name, type, help, labels, value or Histogram)."""
    out: list[str] = []
    for name, kind, help_text, labels, value in metrics:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        if isinstance(value, Histogram):
            out.extend(value.render(name, labels))
        else:
            out.append(f"{name}{{{labels}}} {value}")
    return "\n".join(out) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Sum of each sample name over its label sets (histogram buckets are skipped)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        if name.endswith("_bucket"):
            continue
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


def parse_label(text: str, metric: str, label: str) -> str | None:
    """The value of ``label`` on the first sample of ``metric`` (e.g. vLLM's cache_config_info)."""
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels = line[len(metric) + 1: line.index("}")]
            for part in labels.split(","):
                key, _, val = part.partition("=")
                if key.strip() == label:
                    return val.strip().strip('"')
    return None
