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

``adam``/``adamw`` run PyTorch's fused kernel (``fused=True``) when every parameter is a floating-point
CPU or CUDA tensor: one pass over each tensor instead of a chain of element-wise operations and their
full-size temporaries. It computes the same update (it differs from the for-loop implementation in the
last bit of a few parameters). The choice of kernel is not part of a checkpoint: ``state_dict()`` is
written exactly as the default implementation writes it (``fused: None``, CPU ``step`` tensors) and
``load_state_dict()`` keeps the kernel chosen here, so original checkpoints resume and ours load into
an unfused optimizer. ``opt_args: {fused: false}`` (or any ``fused``/``foreach`` value) overrides the
choice.
"""

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

#: Names whose torch optimizer has a fused step kernel, and the devices it runs on.
_FUSED_NAMES = ("adam", "adamw")
_FUSED_DEVICES = ("cpu", "cuda")


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
    """Make a fused optimizer's checkpoints identical to those of the default implementation.

    ``state_dict()`` reports ``fused: None`` and CPU ``step`` tensors (what the for-loop kernel writes);
    ``load_state_dict()`` restores this optimizer's own kernel flags, which a loaded checkpoint would
    otherwise overwrite with its own (``None`` in every original checkpoint, i.e. the slow kernel), and
    moves ``step`` next to its parameter as the fused kernel requires.
    """
    chosen = [{key: group.get(key) for key in ("fused", "foreach")} for group in optimizer.param_groups]

    def on_save(_: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        for group in state_dict["param_groups"]:
            group["fused"] = None
        # the per-parameter dicts are the live state: replace them, never modify them
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
    """Build the optimizer described by an ``optimizer:`` config section for ``model``.

    ``opt_config`` keys: ``opt`` (case-insensitive, e.g. ``adamW``), ``lr``, ``weight_decay``; optional
    ``opt_eps`` (-> ``eps``), ``opt_betas`` (-> ``betas``), ``opt_args`` (extra keyword arguments) and
    ``momentum`` (SGD/RMSprop-type optimizers, default 0.9). ``model`` may be wrapped in
    ``DistributedDataParallel`` (parameter names then start with ``module.``).
    """
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
        # The original lets Adafactor pick its own relative step size when lr is 0/unset.
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
