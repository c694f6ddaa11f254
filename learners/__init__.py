"""Online learners of feedloop: plain, deterministic, picklable Python with no I/O."""

from learners.ab_test import ABDecision, ABTest
from learners.active_learning import ReviewCandidate, ReviewSelector
from learners.drift import DriftAlarm, DriftMonitor
from learners.features import HashingFeaturizer
from learners.loss_weights import LossWeights
from learners.off_policy import Estimate, OffPolicyEvaluator, RidgeRewardModel
from learners.ridge import OnlineRidge
from learners.router import LinUCBRouter, RoutingDecision

__all__ = [
    "ABDecision",
    "ABTest",
    "DriftAlarm",
    "DriftMonitor",
    "Estimate",
    "HashingFeaturizer",
    "LinUCBRouter",
    "LossWeights",
    "OffPolicyEvaluator",
    "OnlineRidge",
    "ReviewCandidate",
    "ReviewSelector",
    "RidgeRewardModel",
    "RoutingDecision",
]
