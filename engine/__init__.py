"""Offramp engine: multi-exit models that really stop early, measured cost, policies, bundles.

Knows nothing of Qt; the app subscribes to it.
"""
__version__ = "0.1.0"
