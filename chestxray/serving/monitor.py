"""What the server counts (GET /metrics, Prometheus text by prometheus-client) and the out-of-distribution alarm.

The alarm: over the last `window` scored answers, the share flagged out of distribution is compared with what the
checkpoint's detector lets through on its own validation images (1 - model.ood.pass_rate is the share of in-domain
images it flags) by a one-sided binomial test. Far more flags than that means the images have changed (a new
scanner, a new hospital, a broken pipeline): /info shows it, the log says it once. The test is `drift_alarm`, one
small function, so that the project's shared test can replace it.

The counters live in the HTTP process (LitServe forks one per inference worker by default: workers=1, one HTTP
process). With several HTTP processes each counts its own requests and /metrics answers from the one it reached.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)
ALARM_P = 0.01
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class Alarm:
    flagged: int  # answers flagged out of distribution in the window
    scored: int  # answers with a score in the window
    expected: float  # the share the detector flags on in-domain images (1 - pass rate)
    p_value: float
    raised: bool


def drift_alarm(flagged: int, scored: int, expected: float, p: float = ALARM_P) -> Alarm:
    """Whether `flagged` of `scored` is far above the share `expected`: one-sided binomial test, alarm when p < p."""
    from scipy.stats import binomtest

    if scored == 0:
        return Alarm(flagged, scored, expected, 1.0, False)
    p_value = float(binomtest(flagged, scored, min(max(expected, 0.0), 1.0), alternative="greater").pvalue)
    return Alarm(flagged, scored, expected, p_value, p_value < p)


class Monitor:
    """The Prometheus metrics of one HTTP process and the window of recent out-of-distribution flags."""

    def __init__(self, window: int, expected_flagged: float | None):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "chestxray_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "chestxray_request_seconds", "Time to answer, by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.decodes = Counter("chestxray_decodes", "Uploads handed to the image decoder", registry=self.registry)
        self.waiting = Gauge("chestxray_uploads_in_progress", "POST /predict being read, decoded or predicted",
                             registry=self.registry)  # fmt: skip
        self.flagged_share = Gauge(
            "chestxray_ood_flagged_share", "Share of the recent scored answers flagged out of distribution",
            registry=self.registry,
        )  # fmt: skip
        self.window_size = Gauge("chestxray_ood_window", "Scored answers in the recent window", registry=self.registry)
        self.alarm_gauge = Gauge("chestxray_ood_alarm", "1 while the out-of-distribution alarm is raised",
                                 registry=self.registry)  # fmt: skip
        self.flags: deque[bool] = deque(maxlen=window)
        self.expected = expected_flagged
        self.logged = False

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def answered(self, in_distribution: bool | None) -> None:
        """One /predict answer: its flag joins the window (answers not scored are not counted)."""
        if in_distribution is None:
            return
        self.flags.append(not in_distribution)
        self.window_size.set(len(self.flags))
        self.flagged_share.set(sum(self.flags) / len(self.flags))
        alarm = self.alarm()
        if alarm is None:
            return
        self.alarm_gauge.set(int(alarm.raised))
        if alarm.raised and not self.logged:
            self.logged = True
            log.warning(
                "out-of-distribution alarm: %d of the last %d answers flagged, expected %.1f%% (binomial p=%.2g)",
                alarm.flagged, alarm.scored, 100 * alarm.expected, alarm.p_value,
            )  # fmt: skip

    def alarm(self) -> Alarm | None:
        """The alarm over the current window (None when the checkpoint has no pass rate)."""
        if self.expected is None:
            return None
        return drift_alarm(sum(self.flags), len(self.flags), self.expected)

    def summary(self) -> dict:
        """/info's "monitor" part."""
        alarm = self.alarm()
        return {
            "window": self.flags.maxlen,
            "scored": len(self.flags),
            "flagged": sum(self.flags),
            "expected_flagged_share": round(self.expected, 6),
            "alarm": None if alarm is None else alarm.raised,
            "p_value": None if alarm is None else alarm.p_value,
        }

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
