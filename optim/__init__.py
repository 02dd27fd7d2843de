"""Optimizer construction for SIMLA training scripts."""

from optim.optim_factory import OPTIMIZER_NAMES, create_optimizer, param_groups_weight_decay

__all__ = ["OPTIMIZER_NAMES", "create_optimizer", "param_groups_weight_decay"]
