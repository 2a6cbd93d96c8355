"""Counters, gauges and histograms in Prometheus' text format (exposition format 0.0.4)."""

from __future__ import annotations

import bisect
import threading

HELP = {
    "maskstore_requests_total": ("counter", "Generation requests accepted, by persona."),
    "maskstore_generated_tokens_total": ("counter", "Tokens generated, by persona."),
    "maskstore_persona_loads_total": ("counter", "Persona mask loads (first use or reload)."),
    "maskstore_persona_evictions_total": ("counter", "Personas evicted from the mask cache."),
    "maskstore_load_failures_total": ("counter", "Persona loads that failed."),
    "maskstore_persona_cache_bytes": ("gauge", "Bytes of packed masks held in the cache."),
    "maskstore_device_cache_bytes": ("gauge", "Bytes of packed masks in device memory."),
    "maskstore_device_cache_entries": ("gauge", "Module masks held in device memory."),
    "maskstore_device_cache_evictions_total": (
        "counter",
        "Module masks evicted from device memory.",
    ),
    "maskstore_persona_load_seconds": ("histogram", "Time to read a persona's masks."),
    "maskstore_switch_seconds": ("histogram", "Time to switch or set up a batch's personas."),
    "maskstore_batch_rows": ("histogram", "Requests a batch started with."),
    "maskstore_joined_rows_total": ("counter", "Requests that joined a running batch."),
    "maskstore_mixing_speedup": (
        "gauge",
        "A mixed step's speed over one in-place step a persona, measured at start.",
    ),
}
_BUCKETS = {
    "maskstore_batch_rows": (1, 2, 4, 8, 16, 32, 64),
}
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Thread-safe metrics, rendered by :meth:`render`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple], float] = {}
        self._hist: dict[str, tuple[list[int], list[float]]] = {}
        self._replicas: dict[str, dict[tuple[str, tuple], float]] = {}  # absorbed, by replica

    def inc(self, name: str, by: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + by

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] = float(value)

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0.0)

    def snapshot(self, skip: tuple[str, ...] = ()) -> list:
        """Counters and gauges as ``[[name, [[label, value], ...], number], ...]`` (plain
        data: it travels from a Ray replica to the ingress)."""
        with self._lock:
            return [[n, [list(x) for x in lb], v] for (n, lb), v in self._values.items()
                    if n not in skip]  # fmt: skip

    def absorb(self, replica: str, snapshot: list) -> None:
        """Replace what ``replica`` reported last with ``snapshot``: rendered with a
        ``replica`` label beside this process's own figures."""
        rows: dict[tuple[str, tuple], float] = {}
        for name, labels, value in snapshot:
            if name in HELP and isinstance(value, int | float):
                lb = tuple(sorted([*((str(k), str(v)) for k, v in labels), ("replica", replica)]))
                rows[(name, lb)] = float(value)
        with self._lock:
            self._replicas[replica] = rows

    def observe(self, name: str, value: float) -> None:
        bounds = _BUCKETS.get(name, _SECONDS)
        with self._lock:
            counts, total = self._hist.setdefault(name, ([0] * (len(bounds) + 1), [0.0]))
            counts[bisect.bisect_left(bounds, value)] += 1
            total[0] += value

    def render(self) -> str:
        lines = []
        with self._lock:
            values = dict(self._values)
            for rows in self._replicas.values():
                values.update(rows)
            hist = {k: (list(c), t[0]) for k, (c, t) in self._hist.items()}
        for name, (kind, text) in HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                counts, total = hist.get(name, ([0] * (len(_BUCKETS.get(name, _SECONDS)) + 1), 0))
                acc = 0
                for bound, c in zip((*_BUCKETS.get(name, _SECONDS), "+Inf"), counts, strict=True):
                    acc += c
                    lines.append(f'{name}_bucket{{le="{bound}"}} {acc}')
                lines += [f"{name}_sum {total:.6g}", f"{name}_count {acc}"]
                continue
            rows = [(lb, v) for (n, lb), v in sorted(values.items()) if n == name]
            if not rows and kind == "gauge":
                rows = [((), 0.0)]
            for lb, v in rows:
                tags = ",".join(f'{k}="{_escape(val)}"' for k, val in lb)
                lines.append(f"{name}{{{tags}}} {v:g}" if tags else f"{name} {v:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    """A label value as the text format needs it (backslash, quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
