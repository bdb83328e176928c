"""RobustMPC's throughput predictor, shared by the `mpc` and `hybrid` controllers.

Prediction = harmonic mean of the last `window` throughput samples, divided by ``1 + max`` of the last
`window` relative prediction errors, where the error of a sample is ``|prediction - actual| / actual``
with the *undiscounted* harmonic mean predicted before that sample (Pensieve's ``robust_mpc_server.py``; see
``reference/streaming-and-policies.md`` section 3.1).

As in Pensieve, errors are measured against sample-based predictions only. Before the first sample the
prediction is the session's prior (historical throughput) divided by ``1 + prior_error``: a prior from
other sessions is less certain than a measurement of this one. Unlike Pensieve, a sample's throughput leaves
out the round-trip time (``bits / (duration - rtt)``), because the planning model
(`kvcast.policies.planning.ConstantThroughput`) adds the RTT once per request itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from kvcast.policies.base import ThroughputSample

__all__ = ["RobustThroughputEstimator", "DEFAULT_PRIOR_ERROR"]

DEFAULT_PRIOR_ERROR = 0.5
"""Relative error assumed for the prior until this session's first measurement."""


class RobustThroughputEstimator:
    """Error-discounted harmonic-mean throughput predictor (bits/s). Feed it `observe(obs.samples)`."""

    def __init__(self, window: int = 5, rtt_s: float = 0.0, prior_bps: float | None = None,
                 prior_error: float = DEFAULT_PRIOR_ERROR) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not prior_error >= 0:
            raise ValueError(f"prior_error must be >= 0, got {prior_error}")
        self.window = window
        self.prior_error = prior_error
        self.rtt_s = max(0.0, rtt_s)
        self.prior_bps = prior_bps
        self._throughputs: deque[float] = deque(maxlen=window)
        self._errors: deque[float] = deque(maxlen=window)
        self._seen = 0

    def sample_bps(self, sample: ThroughputSample) -> float:
        """Payload throughput of one transfer with the RTT taken out (bits/s)."""
        duration = sample.end_s - sample.start_s
        busy = max(duration - self.rtt_s, 1e-3 * duration, 1e-12)
        return sample.nbytes * 8.0 / busy

    def observe(self, samples: Sequence[ThroughputSample]) -> None:
        """Take in the samples not seen yet (`samples` is the session's whole list, oldest first)."""
        for sample in samples[self._seen:]:
            actual = self.sample_bps(sample)
            predicted = self.harmonic_mean_bps() if self._throughputs else None
            if predicted is not None and actual > 0.0:
                self._errors.append(abs(predicted - actual) / actual)
            self._throughputs.append(actual)
        self._seen = max(self._seen, len(samples))

    def harmonic_mean_bps(self) -> float | None:
        """Undiscounted prediction: harmonic mean of the recent samples (the prior before any sample)."""
        if not self._throughputs:
            return self.prior_bps
        if min(self._throughputs) <= 0.0:
            return 0.0
        return len(self._throughputs) / sum(1.0 / x for x in self._throughputs)

    def max_error(self) -> float:
        """Largest relative prediction error among the recent samples (`prior_error` before any sample)."""
        if not self._throughputs:
            return self.prior_error
        return max(self._errors, default=0.0)

    def predict_bps(self) -> float | None:
        """RobustMPC's prediction: harmonic mean / (1 + max recent error); ``None`` with neither samples
        nor prior."""
        hm = self.harmonic_mean_bps()
        return None if hm is None else hm / (1.0 + self.max_error())
