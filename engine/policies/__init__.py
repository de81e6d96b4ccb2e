"""Policies: what a policy sees (`Evidence`), one interface (`Policy`), one module per family.
Decisions only: training is `engine.train`, scoring `engine.evaluate`."""
from .base import (Evidence, Policy, RowDecider, list_policies, policy_from_json, pooled_features, register_policy,
                   simulate)
from .threshold import MEASURES, OraclePolicy, ThresholdPolicy, confidence
from .bolukbasi import BolukbasiPolicy
from .structure import StructurePolicy

__all__ = ["Evidence", "Policy", "RowDecider", "list_policies", "policy_from_json", "pooled_features", "register_policy",
           "simulate",
           "MEASURES", "OraclePolicy", "ThresholdPolicy", "confidence", "BolukbasiPolicy", "StructurePolicy"]
