"""Policies: one interface (`Policy`), one module per family."""
from .base import Policy, list_policies, policy_from_json, register_policy, simulate
from .threshold import MEASURES, OraclePolicy, ThresholdPolicy, confidence
from .bolukbasi import BolukbasiPolicy, bolukbasi_front, train_bolukbasi, with_policy_flops
from .structure import StructurePolicy, structure_front, train_structure_policy

__all__ = ["Policy", "list_policies", "policy_from_json", "register_policy", "simulate",
           "MEASURES", "OraclePolicy", "ThresholdPolicy", "confidence",
           "BolukbasiPolicy", "bolukbasi_front", "train_bolukbasi", "with_policy_flops",
           "StructurePolicy", "structure_front", "train_structure_policy"]
