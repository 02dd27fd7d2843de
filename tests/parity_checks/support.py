"""Helpers shared by the parity checks."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def fixture_tokenizer(fx: dict):
    """The tokenizer built from the fixture's own vocabulary."""
    from models.tokenization import tokenizer_from_tokens

    return tokenizer_from_tokens(fx["vocab_tokens"])


def check_tokenized(tokenizer, strings: Iterable[str], ids: torch.Tensor, mask: torch.Tensor, **kwargs) -> None:
    """Tokenize ``strings`` with ``kwargs`` and require the fixture's recorded ids and mask."""
    encoded = tokenizer(list(strings), return_tensors="pt", **kwargs)
    if not (torch.equal(encoded.input_ids, ids) and torch.equal(encoded.attention_mask, mask)):
        raise AssertionError(f"tokenizer ids differ from the fixture's recorded ids for {list(strings)!r}")


def grad_outputs(model: torch.nn.Module, full_grad_names: Iterable[str]) -> dict:
    """Per-parameter gradient norms (float64), the total norm, selected full gradients and the
    trainable parameters that received no gradient."""
    norms, missing = {}, []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            missing.append(name)
            continue
        norms[name] = float(param.grad.double().norm())
    params = dict(model.named_parameters())
    return {
        "grad_norms": norms,
        "total_grad_norm": math.sqrt(sum(v * v for v in norms.values())),
        "full_grads": {name: params[name].grad for name in full_grad_names if params[name].grad is not None},
        "params_without_grad": missing,
    }


def fixture_config(fx: dict) -> dict:
    """The fixture's task config with its BERT config given inline (no file needed)."""
    return dict(fx["config"], bert_config=dict(fx["bert_config"]))
