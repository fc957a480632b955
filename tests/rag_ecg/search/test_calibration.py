"""Platt calibration (`fit_platt`, `Calibration.probability`): the confidences users see, checked against
synthetic votes drawn from a logistic model whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from rag_ecg.search.calibration import Calibration, fit_platt

A, B = 6.0, -4.5  # the true model: P(label | vote v) = sigmoid(A * v + B)


def _sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.0, 1.0, n)
    y = (rng.uniform(0.0, 1.0, n) < 1.0 / (1.0 + np.exp(-(A * v + B)))).astype(float)
    return v, y


def _ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: |mean prediction - observed rate| per equal-width bin, weighted by size."""
    edges = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(p[edges == b].mean() - y[edges == b].mean()) * (edges == b).sum()
                     for b in range(bins) if (edges == b).any()) / len(p))


def test_fit_platt_recovers_a_known_logistic_model():
    v, y = _sample(20000, seed=0)
    a, b = fit_platt(v, y)
    assert a == pytest.approx(A, abs=0.3) and b == pytest.approx(B, abs=0.2)
    # the fitted curve is the maximum-likelihood one: the true parameters fit no better
    def nll(a_, b_):
        p = 1.0 / (1.0 + np.exp(-(a_ * v + b_)))
        return -np.sum(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert nll(a, b) <= nll(A, B)


def test_calibrated_probabilities_are_monotone_and_calibrated_on_held_out_votes():
    v, y = _sample(5000, seed=1)
    cal = Calibration(platt={"MI": list(fit_platt(v, y))})
    hv, hy = _sample(5000, seed=2)
    p = np.array([cal.probability("MI", x) for x in hv])
    xs = np.linspace(0, 1, 101)
    grid = np.array([cal.probability("MI", x) for x in xs])
    assert np.all(np.diff(grid) > 0)  # more neighbour votes, more confidence
    assert np.abs(grid - 1.0 / (1.0 + np.exp(-(A * xs + B)))).max() < 0.03  # the true curve
    raw_ece = _ece(hv, hy)  # the uncalibrated vote read as a probability
    assert raw_ece > 0.1  # (the synthetic votes are badly calibrated as they stand)
    assert _ece(p, hy) < 0.03 < raw_ece


def test_a_label_without_platt_parameters_keeps_its_raw_vote():
    cal = Calibration(platt={"MI": [2.0, -1.0]})
    assert cal.probability("NORM", 0.37) == pytest.approx(0.37)
    assert cal.probability("MI", 0.5) == pytest.approx(0.5)  # sigmoid(2*0.5 - 1) = sigmoid(0)
    assert cal.probability("MI", 1.0) == pytest.approx(1 / (1 + np.exp(-1.0)))


def test_fit_platt_on_separable_votes_stays_finite_and_ordered():
    v = np.array([0.0, 0.1, 0.2, 0.8, 0.9, 1.0])
    y = np.array([0, 0, 0, 1, 1, 1])
    a, b = fit_platt(v, y)
    assert np.isfinite([a, b]).all() and a > 0
    cal = Calibration(platt={"X": [a, b]})
    assert cal.probability("X", 0.1) < 0.5 < cal.probability("X", 0.9)
