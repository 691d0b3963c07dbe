"""/metrics in Prometheus's exposition format, from the running totals in Redis.

The counters are the totals since the counters began (they reset only if Redis loses its
data, which Prometheus handles as a counter reset); the roll-up copies the same counts into
the database, minute by minute. Queue depths are read from the broker at each scrape.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from monitoring import broker, metrics, rollup
from tasks.models import DeadLetter

logger = logging.getLogger(__name__)

HISTOGRAM_METRICS = {
    "rt": ("jobs_task_runtime_seconds", "Time tasks ran, from start to finish"),
    "wt": ("jobs_task_queue_wait_seconds", "Time from publish (or ETA) to start"),
}


def read_totals() -> dict[tuple[str, str], dict[str, int]]:
    raw = rollup.redis_client().hgetall(metrics.TOTALS_KEY)
    totals: defaultdict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for key, value in raw.items():
        task, queue, name = metrics.split_field(key.decode())
        totals[(task, queue)][name] = int(value)
    return dict(totals)


class JobsCollector:
    def collect(self) -> Iterator[Metric]:
        outcomes = CounterMetricFamily(
            "jobs_tasks", "Tasks by name, queue and outcome", labels=["task", "queue", "outcome"]
        )
        exceptions = CounterMetricFamily(
            "jobs_task_exceptions",
            "Exceptions raised by tasks (failures and retries)",
            labels=["task", "queue", "exception"],
        )
        histograms = {
            name: HistogramMetricFamily(metric, doc, labels=["task", "queue"])
            for name, (metric, doc) in HISTOGRAM_METRICS.items()
        }
        for (task, queue), counts in sorted(read_totals().items()):
            for outcome in metrics.OUTCOMES:
                outcomes.add_metric([task, queue, outcome], counts.get(outcome, 0))
            for name, count in counts.items():
                if name.startswith("exc:"):
                    exceptions.add_metric([task, queue, name[4:]], count)
            for histogram, family in histograms.items():
                cumulative, buckets = 0, []
                for index, bound in enumerate(metrics.BUCKETS):
                    cumulative += counts.get(f"{histogram}:{index}", 0)
                    buckets.append(("+Inf" if math.isinf(bound) else repr(float(bound)), cumulative))
                if cumulative:
                    family.add_metric([task, queue], buckets, counts.get(f"{histogram}_sum", 0) / 1_000_000)
        yield outcomes
        yield exceptions
        yield from histograms.values()

        depth = GaugeMetricFamily(
            "jobs_queue_messages", "Messages in each queue, by state", labels=["queue", "state"]
        )
        up = GaugeMetricFamily("jobs_broker_up", "1 when the broker answered this scrape")
        try:
            for name, item in broker.queue_depths().items():
                depth.add_metric([name, "ready"], item.ready)
                if item.unacked is not None:
                    depth.add_metric([name, "unacked"], item.unacked)
            up.add_metric([], 1)
        except broker.BrokerError as exc:
            logger.warning("metrics: queue depths unavailable: %s", exc)
            up.add_metric([], 0)
        yield depth
        yield up
        yield GaugeMetricFamily(
            "jobs_dead_letters_waiting",
            "Dead letters not replayed yet",
            value=DeadLetter.objects.filter(replayed_at__isnull=True).count(),
        )


def exposition() -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsCollector())
    return generate_latest(registry)
