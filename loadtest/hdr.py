"""A small HDR-style histogram: log-linear buckets, constant memory, mergeable.

Values are non-negative integers (the harness records microseconds). Values
below 256 get a bucket each; above that, every power of two is split into 128
linear sub-buckets, so a bucket's width is under 1/128 of its values: every
percentile is exact to better than 0.8 %, whatever the number of samples,
and nothing is ever sorted. Recording one value is a bit count, a shift and a
dict increment.

Histograms merge by adding their counts (:meth:`Histogram.merge`), which is
how worker processes' histograms become one, and travel as JSON through
:meth:`Histogram.to_dict` and :meth:`Histogram.from_dict`.

We wrote this rather than depend on the ``hdrhistogram`` package: it is 100
lines, needs no compiled extension, and the sparse dict form is what the
workers send to the parent anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["Histogram", "bucket_bounds", "bucket_index"]

SUB_BITS = 7
"""Each power of two above ``2 * 2**SUB_BITS`` is split into ``2**SUB_BITS`` buckets."""
_SUB_COUNT = 1 << SUB_BITS
_LINEAR_LIMIT = 2 * _SUB_COUNT  # values below this have a bucket each


def bucket_index(value: int) -> int:
    """The bucket of a non-negative integer (negative values count as 0)."""
    if value < _LINEAR_LIMIT:
        return value if value > 0 else 0
    shift = value.bit_length() - (SUB_BITS + 1)
    return (shift << SUB_BITS) + (value >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """The lowest and highest value of bucket ``index``, both included."""
    if index < _LINEAR_LIMIT:
        return index, index
    shift = (index >> SUB_BITS) - 1
    mantissa = index - (shift << SUB_BITS)
    return mantissa << shift, ((mantissa + 1) << shift) - 1


class Histogram:
    """Counts of values in log-linear buckets, plus exact count, sum, min and max."""

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        """Bucket index -> number of values recorded in it."""
        self.count = 0
        """Number of values recorded."""
        self.total = 0
        """Sum of the values recorded (for the mean)."""
        self.min = 0
        """Smallest value recorded (0 when empty)."""
        self.max = 0
        """Largest value recorded (0 when empty)."""

    # Public methods

    def record(self, value: int) -> None:
        """Record one value (negative values are recorded as 0)."""
        if value < 0:
            value = 0
        if value < _LINEAR_LIMIT:
            index = value
        else:
            shift = value.bit_length() - (SUB_BITS + 1)
            index = (shift << SUB_BITS) + (value >> shift)
        counts = self.counts
        counts[index] = counts.get(index, 0) + 1
        if self.count == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.count += 1
        self.total += value

    def merge(self, other: Histogram) -> None:
        """Add every value of ``other`` to this histogram."""
        if other.count == 0:
            return
        counts = self.counts
        for index, n in other.counts.items():
            counts[index] = counts.get(index, 0) + n
        if self.count == 0 or other.min < self.min:
            self.min = other.min
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def percentile(self, q: float) -> int:
        """The value below or at which ``q`` percent of the values fall.

        Like HdrHistogram, answers the highest value of the bucket that holds
        the rank, capped by the exact maximum; 0 when empty.
        """
        if self.count == 0:
            return 0
        rank = max(1, min(self.count, int(q / 100 * self.count + 0.999999)))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(bucket_bounds(index)[1], self.max)
        return self.max  # pragma: no cover - counts add up to count

    def mean(self) -> float:
        """The mean of the values (0.0 when empty)."""
        return self.total / self.count if self.count else 0.0

    def buckets(self) -> Iterator[tuple[int, int, int]]:
        """Yield ``(low, high, count)`` for each non-empty bucket, in order."""
        for index in sorted(self.counts):
            low, high = bucket_bounds(index)
            yield low, high, self.counts[index]

    def summary(self, scale: float = 1.0) -> dict[str, float]:
        """Percentiles p50, p90, p99, p99.9, max, mean and count, each divided by ``scale``."""
        return {
            "count": self.count,
            "p50": self.percentile(50) / scale,
            "p90": self.percentile(90) / scale,
            "p99": self.percentile(99) / scale,
            "p99.9": self.percentile(99.9) / scale,
            "max": self.max / scale,
            "mean": self.mean() / scale,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form; :meth:`from_dict` reads it back."""
        return {
            "counts": [[i, n] for i, n in sorted(self.counts.items())],
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        """Rebuild a histogram written by :meth:`to_dict`."""
        h = cls()
        h.counts = {int(i): int(n) for i, n in data["counts"]}
        h.count = int(data["count"])
        h.total = int(data["total"])
        h.min = int(data["min"])
        h.max = int(data["max"])
        return h

    def __repr__(self) -> str:
        return f"<Histogram count={self.count} p50={self.percentile(50)} max={self.max}>"
