"""Policies: one interface (`Policy`), one module per family."""
from .base import Policy, list_policies, policy_from_json, register_policy, simulate
from .threshold import MEASURES, OraclePolicy, ThresholdPolicy, confidence

__all__ = ["Policy", "list_policies", "policy_from_json", "register_policy", "simulate",
           "MEASURES", "OraclePolicy", "ThresholdPolicy", "confidence"]
