"""Online ridge regression that keeps the inverse Gram matrix up to date."""

from __future__ import annotations

import math

import numpy as np


class OnlineRidge:
    """Ridge regression of a scalar target, updated one example at a time.

    Keeps ``A^-1`` with ``A = l2 * I + sum x x^T`` and updates it with the Sherman-Morrison
    formula, O(d^2) per example instead of an O(d^3) re-inversion. With a ``prior_mean``
    the penalty is ``l2 * ||w - prior_mean||^2``, so the weights start at the prior and move
    away from it as data arrives (a warm start that keeps the full uncertainty).

    ``residual_ss`` is the penalised residual sum of squares ``sum (y - w.x)^2 + l2 ||w -
    prior_mean||^2``, kept as ``sum y^2 + l2 ||prior_mean||^2 - w.b`` (one running sum): the
    statistic a Bayesian reading of the ridge (normal-inverse-gamma) estimates the target's
    noise variance from.

    Parameters
    ----------
    dim
        Number of features.
    l2
        Ridge penalty; also the prior precision of the weights.
    prior_mean
        Weights to shrink towards; zeros when omitted.

    Examples
    --------
    >>> import numpy as np
    >>> model = OnlineRidge(dim=2, l2=0.01)
    >>> for _ in range(100):
    ...     model.learn_one(np.array([1.0, 2.0]), 5.0)
    ...     model.learn_one(np.array([1.0, -1.0]), -1.0)
    >>> round(model.predict(np.array([1.0, 0.0])), 2)
    1.0
    >>> round(model.residual_ss, 3)  # the two targets are fitted exactly, up to the penalty
    0.05
    >>> copy = OnlineRidge.from_array(model.to_array(), n=model.n, l2=0.01)
    >>> copy.predict(np.array([3.0, -1.0])) == model.predict(np.array([3.0, -1.0]))
    True
    """

    def __init__(self, dim: int, l2: float = 1.0, prior_mean: np.ndarray | None = None):
        if l2 <= 0:
            raise ValueError("l2 must be positive")
        self._a_inv = np.eye(dim) / l2
        self._b = np.zeros(dim) if prior_mean is None else l2 * np.asarray(prior_mean, float)
        self.weights = self._a_inv @ self._b
        self._yy = float(self.weights @ self._b)  # l2 ||prior_mean||^2: no residual yet
        self.n = 0

    def predict(self, x: np.ndarray) -> float:
        return float(self.weights @ x)

    def uncertainty(self, x: np.ndarray) -> float:
        """``sqrt(x^T A^-1 x)``: the width of the prediction's confidence, up to a scale."""
        return float(np.sqrt(x @ self._a_inv @ x))

    @property
    def residual_ss(self) -> float:
        # max: rounding may leave the difference of two large sums just below 0.
        return max(0.0, self._yy - float(self.weights @ self._b))

    def learn_one(self, x: np.ndarray, y: float) -> None:
        a_inv_x = self._a_inv @ x
        self._a_inv -= np.outer(a_inv_x, a_inv_x) / (1.0 + x @ a_inv_x)
        self._b += y * x
        self._yy += y * y
        self.weights = self._a_inv @ self._b
        self.n += 1

    def to_array(self) -> np.ndarray:
        """``A^-1``, ``b``, ``w`` and the running ``sum y^2`` term in one float64 vector of
        length ``d^2 + 2d + 1``: with ``n`` and ``l2``, all ``from_array`` needs to rebuild the
        model exactly. ``w`` is kept, not recomputed from the others, so the copy predicts bit
        for bit what the model does."""
        return np.concatenate([self._a_inv.ravel(), self._b, self.weights, [self._yy]])

    @classmethod
    def from_array(cls, values: np.ndarray, n: int, l2: float) -> OnlineRidge:
        dim = math.isqrt(values.size) - 1  # values.size = d^2 + 2d + 1 = (d + 1)^2
        if dim < 1 or values.size != (dim + 1) ** 2:
            raise ValueError(f"{values.size} values are no ridge model's A^-1, b, w and sum of squares")
        model = cls(dim, l2)
        # Copies: the values may be a read-only view of the bytes they were read from.
        model._a_inv = values[: dim * dim].reshape(dim, dim).copy()
        model._b = values[dim * dim : dim * dim + dim].copy()
        model.weights = values[dim * dim + dim : dim * dim + 2 * dim].copy()
        model._yy = float(values[-1])
        model.n = n
        return model
