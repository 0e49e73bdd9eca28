"""The decision band: class-conditional split-conformal cut-offs on the score x = q − tau.

Validation slices (out-of-fold: tau, q and the truth never saw them in fitting) carry x_i = q_i − τ_i
and the truth *bad* (Dice(AI, experts) < the experts' DSC Lesion) or *good*. For targets α
(``pipeline.max_missed_bad``, default 0.10) and β (``pipeline.max_rejected_good``, default 0.10):

* accept_at = the k-th smallest x among the n_bad bad slices, k = ⌈(n_bad + 1)(1 − α)⌉, nudged up by
  one float step; accept iff x ≥ accept_at. For a new bad slice exchangeable with the validation bad
  slices, P(accepted) ≤ α (split-conformal; k > n_bad → accept_at = +∞: accept impossible).
* reject_below = the j-th smallest x among the n_good good slices, j = ⌊(n_good + 1) β⌋; reject iff
  x < reject_below. For a new good slice, P(rejected) ≤ β (j = 0 → −∞: reject impossible).
* if reject_below > accept_at the two regions would overlap: reject_below = accept_at (accept keeps
  its guarantee, reject gets stricter).
* review otherwise.

In the verdict rule's terms (``qcgate.core.results.slice_verdict``): accept if q ≥ τ + m_accept,
reject if q < τ − m_reject, with m_accept = accept_at and m_reject = −reject_below (either may be
negative: an estimator that under-estimates the Dice accepts below τ).

The guarantees are marginal over slices like the validation ones (same AI source, same cohort); they
say nothing about a different AI. The sorted validation scores are stored (rounded to 1e-4) so that a
site may set other targets without refitting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

METHOD = "class-conditional split-conformal on q - tau"


@dataclass
class DecisionBand:
    accept_at: float  # accept iff q − τ ≥ accept_at
    reject_below: float  # reject iff q − τ < reject_below
    max_missed_bad: float
    max_rejected_good: float
    bad_scores: np.ndarray  # sorted validation x of bad slices
    good_scores: np.ndarray  # sorted validation x of good slices
    method: str = METHOD

    @property
    def n_bad(self) -> int:
        return int(len(self.bad_scores))

    @property
    def n_good(self) -> int:
        return int(len(self.good_scores))

    @property
    def margin_accept(self) -> float:
        return self.accept_at

    @property
    def margin_reject(self) -> float:
        return -self.reject_below

    def decide(self, tau: np.ndarray, q: np.ndarray) -> np.ndarray:
        """'accept' / 'review' / 'reject' per slice (NaN q → review)."""
        x = np.asarray(q, dtype=np.float64) - np.asarray(tau, dtype=np.float64)
        out = np.full(x.shape, "review", dtype=object)
        finite = np.isfinite(x)
        out[finite & (x >= self.accept_at)] = "accept"
        out[finite & (x < self.reject_below) & (x < self.accept_at)] = "reject"
        return out

    def with_targets(self, max_missed_bad: float, max_rejected_good: float) -> DecisionBand:
        return fit_band_from_scores(self.bad_scores, self.good_scores, max_missed_bad, max_rejected_good)

    def describe(self) -> str:
        def fmt(v: float) -> str:
            return "never" if not math.isfinite(v) else f"{v:+.3f}"
        return (f"accept if q - tau >= {fmt(self.accept_at)}, reject if q - tau < {fmt(self.reject_below)}, "
                f"else review ({self.method}; targets: missed bad <= {self.max_missed_bad:.0%}, rejected good <= "
                f"{self.max_rejected_good:.0%}; {self.n_bad} bad / {self.n_good} good validation slices)")


def conformal_accept_cut(bad_scores: np.ndarray, alpha: float) -> float:
    """The k-th smallest bad score, k = ⌈(n + 1)(1 − α)⌉, one float step up; +∞ when k > n."""
    scores = np.sort(np.asarray(bad_scores, dtype=np.float64))
    n = len(scores)
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-12)
    if k > n or n == 0:
        return math.inf
    return float(np.nextafter(scores[max(k, 1) - 1], math.inf))


def conformal_reject_cut(good_scores: np.ndarray, beta: float) -> float:
    """The j-th smallest good score, j = ⌊(n + 1) β⌋; −∞ when j = 0."""
    scores = np.sort(np.asarray(good_scores, dtype=np.float64))
    n = len(scores)
    j = math.floor((n + 1) * beta + 1e-12)
    if j < 1 or n == 0:
        return -math.inf
    return float(scores[min(j, n) - 1])


def fit_band_from_scores(bad_scores: np.ndarray, good_scores: np.ndarray, max_missed_bad: float = 0.10,
                         max_rejected_good: float = 0.10) -> DecisionBand:
    bad = np.sort(np.asarray(bad_scores, dtype=np.float64))
    good = np.sort(np.asarray(good_scores, dtype=np.float64))
    accept_at = conformal_accept_cut(bad, max_missed_bad)
    reject_below = min(conformal_reject_cut(good, max_rejected_good), accept_at)
    return DecisionBand(accept_at, reject_below, float(max_missed_bad), float(max_rejected_good), bad, good)


def fit_band(tau: np.ndarray, q: np.ndarray, bad: np.ndarray, max_missed_bad: float = 0.10,
             max_rejected_good: float = 0.10) -> DecisionBand:
    """The band from validation (τ, q, truth bad) triples (see the module docstring)."""
    x = np.asarray(q, dtype=np.float64) - np.asarray(tau, dtype=np.float64)
    bad = np.asarray(bad, dtype=bool)
    keep = np.isfinite(x)
    return fit_band_from_scores(x[keep & bad], x[keep & ~bad], max_missed_bad, max_rejected_good)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def band_to_dict(band: DecisionBand) -> dict:
    return {"method": band.method, "accept_at": _finite_or_none(band.accept_at),
            "reject_below": _finite_or_none(band.reject_below), "max_missed_bad": band.max_missed_bad,
            "max_rejected_good": band.max_rejected_good,
            "bad_scores": [round(float(v), 4) for v in band.bad_scores],
            "good_scores": [round(float(v), 4) for v in band.good_scores]}


def band_from_dict(payload: dict) -> DecisionBand:
    accept = payload.get("accept_at")
    reject = payload.get("reject_below")
    return DecisionBand(math.inf if accept is None else float(accept), -math.inf if reject is None else float(reject),
                        float(payload["max_missed_bad"]), float(payload["max_rejected_good"]),
                        np.asarray(payload.get("bad_scores", []), dtype=np.float64),
                        np.asarray(payload.get("good_scores", []), dtype=np.float64),
                        str(payload.get("method", METHOD)))
