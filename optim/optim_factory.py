"""Optimizer factory for the ``optimizer:`` config section; ``adam``/``adamw`` fused where possible."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from configs.schema import section_values

__all__ = [
    "OPTIMIZER_NAMES",
    "create_optimizer",
    "keep_default_checkpoint_format",
    "param_groups_weight_decay",
]

# Name accepted in ``opt`` -> (timm 1.x registry name, extra keyword arguments); ``fused*`` need apex.
_OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {}),
    "nesterov": ("sgd", {}),
    "momentum": ("momentum", {}),
    "adam": ("adam", {}),
    "adamw": ("adamw", {}),
    "nadam": ("nadamlegacy", {}),
    "radam": ("radamlegacy", {}),
    "adamp": ("adamp", {}),
    "sgdp": ("sgdp", {}),
    "adadelta": ("adadelta", {}),
    "adafactor": ("adafactor", {}),
    "adahessian": ("adahessian", {}),
    "rmsprop": ("rmsprop", {}),
    "rmsproptf": ("rmsproptf", {}),
    "novograd": ("novograd", {}),
    "nvnovograd": ("novograd", {}),
    "fusedsgd": ("fusedsgd", {}),
    "fusedmomentum": ("fusedsgd", {"nesterov": False}),
    "fusedadam": ("fusedadam", {}),
    "fusedadamw": ("fusedadamw", {}),
    "fusedlamb": ("fusedlamb", {}),
    "fusednovograd": ("fusednovograd", {}),
}

OPTIMIZER_NAMES: tuple[str, ...] = tuple(_OPTIMIZERS)

_FUSED_NAMES = ("adam", "adamw")
_FUSED_DEVICES = ("cpu", "cuda")


def param_groups_weight_decay(
    model: nn.Module,
    weight_decay: float,
    skip_list: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Split trainable parameters into ``[no_decay_group, decay_group]`` (both always returned)."""
    skip = set(skip_list)
    no_decay: list[nn.Parameter] = []
    decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def _flat_params(params: Any) -> list[torch.Tensor]:
    flat: list[torch.Tensor] = []
    for item in params:
        flat.extend(item["params"] if isinstance(item, Mapping) else [item])
    return flat


def _fused_supported(params: Any) -> bool:
    """Whether every parameter is a floating-point tensor on a device with a fused Adam kernel."""
    flat = _flat_params(params)
    return bool(flat) and all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in flat)


def keep_default_checkpoint_format(optimizer: torch.optim.Optimizer) -> None:
    """Make a fused optimizer's checkpoints identical to the default implementation's, loading included."""
    chosen = [{key: group.get(key) for key in ("fused", "foreach")} for group in optimizer.param_groups]

    def on_save(_: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        for group in state_dict["param_groups"]:
            group["fused"] = None
        state_dict["state"] = {
            key: {name: (value.cpu() if name == "step" and isinstance(value, torch.Tensor) else value)
                  for name, value in entry.items()}
            for key, entry in state_dict["state"].items()
        }
        return state_dict

    def on_load(opt: torch.optim.Optimizer) -> None:
        for group, flags in zip(opt.param_groups, chosen):
            group.update(flags)
            if not group.get("fused"):
                continue
            for param in group["params"]:
                entry = opt.state.get(param)
                if entry and isinstance(entry.get("step"), torch.Tensor):
                    entry["step"] = entry["step"].to(device=param.device, dtype=torch.float32)

    optimizer.register_state_dict_post_hook(on_save)
    optimizer.register_load_state_dict_post_hook(on_load)


def _parse_name(opt: str) -> tuple[str, bool]:
    parts = opt.lower().split("_")
    base = parts[-1]
    if base not in _OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer opt={opt!r}: '{base}' is not one of {', '.join(OPTIMIZER_NAMES)} "
            "(optionally prefixed with 'lookahead_')"
        )
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "lookahead"):
        raise ValueError(
            f"Unknown optimizer opt={opt!r}: the only supported prefix is 'lookahead_' "
            f"(valid names: {', '.join(OPTIMIZER_NAMES)})"
        )
    return base, len(parts) == 2


def create_optimizer(opt_config: Mapping[str, Any] | Any, model: nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer described by an ``optimizer:`` config section for ``model`` (may be DDP)."""
    cfg = section_values(opt_config, "optimizer")
    base, use_lookahead = _parse_name(str(cfg["opt"]))
    lr = cfg["lr"]
    weight_decay = float(cfg["weight_decay"])

    params: Any
    if weight_decay:
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        params = param_groups_weight_decay(model, weight_decay, skip)
        default_decay = 0.0
    else:
        params = list(model.parameters())
        default_decay = weight_decay

    timm_name, extra = _OPTIMIZERS[base]
    kwargs: dict[str, Any] = dict(extra)
    if cfg["opt_eps"] is not None:
        kwargs["eps"] = float(cfg["opt_eps"])
    if cfg["opt_betas"] is not None:
        kwargs["betas"] = tuple(float(b) for b in cfg["opt_betas"])
    if cfg["opt_args"] is not None:
        kwargs.update(dict(cfg["opt_args"]))
    if base == "adafactor" and not lr:
        lr = None
    momentum = float(cfg["momentum"])

    fused = (base in _FUSED_NAMES and not use_lookahead and "fused" not in kwargs and "foreach" not in kwargs
             and _fused_supported(params))
    if fused:
        kwargs["fused"] = True
    name = f"lookahead_{timm_name}" if use_lookahead else timm_name
    optimizer = create_optimizer_v2(
        params,
        opt=name,
        lr=None if lr is None else float(lr),
        weight_decay=default_decay,
        momentum=momentum,
        **kwargs,
    )
    if fused:
        keep_default_checkpoint_format(optimizer)
    return optimizer
