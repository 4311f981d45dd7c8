"""hub/metrics.py: counters with cached labelled children."""

from __future__ import annotations

from hub.metrics import Metrics


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_job_ended_counts_by_status_and_error():
    metrics = Metrics("h1")

    metrics.job_ended("finished", "")
    metrics.job_ended("finished", "")
    metrics.job_ended("failed", "JOB_TIMEOUT")

    assert value(metrics, "hub_jobs_ended_total", status="finished", error="") == 2
    assert value(metrics, "hub_jobs_ended_total", status="failed", error="JOB_TIMEOUT") == 1


def test_job_ended_keeps_the_error_labels_bounded():
    metrics = Metrics("h1")

    for i in range(300):  # node error texts are open-ended: one label set would grow forever
        metrics.job_ended("failed", f"error {i}")
    for i in range(100):  # codes of the nodes' own: the first 64 are kept
        metrics.job_ended("failed", f"MODEL_ERROR_{i}")
    metrics.job_ended("failed", "NODE_LOST")  # the protocol's, always

    assert value(metrics, "hub_jobs_ended_total", status="failed", error="OTHER") == 300 + 36
    assert value(metrics, "hub_jobs_ended_total", status="failed", error="MODEL_ERROR_63") == 1
    assert value(metrics, "hub_jobs_ended_total", status="failed", error="MODEL_ERROR_64") is None
    assert value(metrics, "hub_jobs_ended_total", status="failed", error="NODE_LOST") == 1
    assert value(metrics, "hub_jobs_ended_total", status="failed", error="error 0") is None


def test_job_refused_counts_by_code():
    metrics = Metrics("h1")

    metrics.job_refused("QUEUE_FULL")
    metrics.job_refused("QUEUE_FULL")
    metrics.refused.labels("QUEUE_FULL").inc()  # the same child as labels() gives

    assert value(metrics, "hub_jobs_refused_total", code="QUEUE_FULL") == 3
