"""Pools of model replicas, the cluster view, and every routing decision as pure code."""
