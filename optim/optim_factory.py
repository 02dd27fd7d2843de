"""Optimizer factory driven by the ``optimizer:`` section of a SIMLA config.

The parameter grouping reproduces the original SIMLA code exactly:

* parameters with ``requires_grad=False`` (momentum encoders, a frozen ViT) are left out;
* group 0 holds the parameters that get no weight decay: every 1-D tensor, every parameter whose name
  ends in ``.bias`` and every name returned by ``model.no_weight_decay()`` when the *top-level* module
  defines that method (a wrapped ViT's own list is never consulted);
* group 1 holds every other parameter with the configured ``weight_decay``. Tensors of any other rank
  are decayed, including 0-D scalars such as ``temp`` and 3-D tokens such as ``pos_embed``;
* both groups keep ``named_parameters()`` order and list a shared (tied) parameter once;
* with ``weight_decay == 0`` all trainable parameters form a single group.

The optimizer itself is chosen by the last ``_``-separated part of ``opt`` (lower-cased); a
``lookahead_`` prefix wraps the result in :class:`timm.optim.Lookahead`. ``adamw`` (what every shipped
config uses) is :class:`torch.optim.AdamW` with betas ``(0.9, 0.999)``, eps ``1e-8`` and no amsgrad.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from torch import nn

__all__ = [
    "OPTIMIZER_NAMES",
    "create_optimizer",
    "param_groups_weight_decay",
]

# Name accepted in ``opt`` -> (timm 1.x registry name, extra keyword arguments).
# ``nadam``/``radam`` select timm's legacy implementations, which are the ones the original code used.
# The original ``novograd`` class no longer exists in timm 1.x; both novograd names use NvNovoGrad.
# ``fused*`` names need NVIDIA apex, exactly like the original.
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

#: Every value of ``opt`` (without the optional ``lookahead_`` prefix) that :func:`create_optimizer` accepts.
OPTIMIZER_NAMES: tuple[str, ...] = tuple(_OPTIMIZERS)

_MISSING = object()


def _cfg_get(cfg: Any, key: str, default: Any = _MISSING) -> Any:
    """Read ``key`` from a mapping or an attribute-style config; ``None`` counts as absent."""
    if isinstance(cfg, Mapping):
        value = cfg.get(key, None)
    else:
        value = getattr(cfg, key, None)
    if value is None:
        if default is _MISSING:
            raise KeyError(f"optimizer config is missing the required key '{key}'")
        return default
    return value


def param_groups_weight_decay(
    model: nn.Module,
    weight_decay: float,
    skip_list: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into ``[no_decay_group, decay_group]`` like the original.

    A parameter goes to the no-decay group (index 0, ``weight_decay=0.0``) when it is 1-D, when its
    name ends in ``.bias`` or when its name is in ``skip_list``; every other trainable parameter goes to
    the decay group (index 1). Both groups are always returned, even if one is empty.
    """
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
    """Build the optimizer described by an ``optimizer:`` config section for ``model``.

    ``opt_config`` keys: ``opt`` (case-insensitive, e.g. ``adamW``), ``lr``, ``weight_decay``; optional
    ``opt_eps`` (-> ``eps``), ``opt_betas`` (-> ``betas``), ``opt_args`` (extra keyword arguments) and
    ``momentum`` (SGD/RMSprop-type optimizers, default 0.9). ``model`` may be wrapped in
    ``DistributedDataParallel`` (parameter names then start with ``module.``).
    """
    opt = str(_cfg_get(opt_config, "opt"))
    base, use_lookahead = _parse_name(opt)
    lr = _cfg_get(opt_config, "lr")
    weight_decay = float(_cfg_get(opt_config, "weight_decay", 0.0))

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
    eps = _cfg_get(opt_config, "opt_eps", None)
    if eps is not None:
        kwargs["eps"] = float(eps)
    betas = _cfg_get(opt_config, "opt_betas", None)
    if betas is not None:
        kwargs["betas"] = tuple(float(b) for b in betas)
    opt_args = _cfg_get(opt_config, "opt_args", None)
    if opt_args is not None:
        kwargs.update(dict(opt_args))
    if base == "adafactor" and not lr:
        # The original lets Adafactor pick its own relative step size when lr is 0/unset.
        lr = None
    momentum = float(_cfg_get(opt_config, "momentum", 0.9))

    name = f"lookahead_{timm_name}" if use_lookahead else timm_name
    return create_optimizer_v2(
        params,
        opt=name,
        lr=None if lr is None else float(lr),
        weight_decay=default_decay,
        momentum=momentum,
        **kwargs,
    )
