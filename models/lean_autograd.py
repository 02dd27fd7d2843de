"""Autograd operations that keep less for backward and compute bitwise the same numbers (CPU, eager)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

_enabled = True


def lean_activations_enabled() -> bool:
    """Whether the lean operations are switched on (the default)."""
    return _enabled


@contextmanager
def use_lean_activations(enabled: bool) -> Iterator[None]:
    """Switch the lean operations on or off inside the ``with`` block (restored afterwards)."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = previous


def _lean_on_cpu(*tensors: torch.Tensor) -> bool:
    """Lean operations apply: switched on, eager mode, gradient recording, CPU tensors, one needs grad."""
    return (_enabled and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and all(t.device.type == "cpu" for t in tensors) and any(t.requires_grad for t in tensors))


def has_module_hooks(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` (or all modules globally) has hooks that a lean path would skip."""
    registry = nn.modules.module
    if (registry._global_forward_hooks or registry._global_forward_pre_hooks
            or registry._global_backward_hooks or registry._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def _active_dropout(p: float, training: bool) -> bool:
    """Dropout that draws random numbers and scales (``p`` strictly between 0 and 1, training)."""
    return training and 0.0 < p < 1.0


def _draw_noise(like: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The scaled ``noise`` of CPU ``F.dropout`` (same draw) and the bool mask of its non-zero entries."""
    noise = torch.empty_like(like).bernoulli_(1 - p)
    keep = noise.bool()
    return noise.div_(1 - p), keep


def _noise_from(keep: torch.Tensor, dtype: torch.dtype, p: float) -> torch.Tensor:
    """Rebuild the scaled noise from its mask: the same 0/1 values, divided the same way."""
    return keep.to(dtype).div_(1 - p)


class _MaskedDropout(torch.autograd.Function):
    """``x * noise`` as CPU ``F.dropout`` computes it, keeping a one-byte mask instead of ``noise``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        noise, keep = _draw_noise(x, p)
        ctx.p, ctx.dtype = p, x.dtype
        ctx.save_for_backward(keep)
        return x * noise

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (keep,) = ctx.saved_tensors
        return grad * _noise_from(keep, ctx.dtype, ctx.p), None


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """``F.dropout`` bitwise; on CPU with grad, backward keeps a one-byte mask instead of the noise."""
    if not inplace and _active_dropout(p, training) and _lean_on_cpu(x) and x.numel() > 0:
        return _MaskedDropout.apply(x, p)
    return F.dropout(x, p, training, inplace)


class LeanDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``/``inplace`` attributes, no state) that runs :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.inplace)


def _batched(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its batch dimensions folded into one, as ``torch.matmul`` folds it for ``bmm``."""
    return x.reshape(math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1])


def _keeps_value(value: torch.Tensor) -> bool:
    """Keep ``value`` itself for backward when it holds no more memory than its folded copy."""
    return value.untyped_storage().nbytes() <= value.numel() * value.element_size()


class _DropoutMatmul(torch.autograd.Function):
    """``torch.matmul(F.dropout(probs, p), value)`` on CPU; backward recomputes the dropout."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, value: torch.Tensor, p: float) -> torch.Tensor:
        noise, keep = _draw_noise(probs, p)
        dropped = probs * noise
        del noise
        value3d = _batched(value)
        out = torch.bmm(_batched(dropped), value3d)
        ctx.p, ctx.dtype, ctx.value_shape = p, probs.dtype, value.shape
        ctx.keeps_value = _keeps_value(value)
        ctx.save_for_backward(probs, keep, value if ctx.keeps_value else value3d)
        return out.view(*probs.shape[:-1], value.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        probs, keep, kept_value = ctx.saved_tensors
        noise = _noise_from(keep, ctx.dtype, ctx.p)
        grad3d = _batched(grad)
        grad_probs = grad_value = None
        if ctx.needs_input_grad[0]:
            value3d = _batched(kept_value) if ctx.keeps_value else kept_value
            grad_dropped = grad3d.bmm(value3d.transpose(1, 2)).reshape(probs.shape)
            grad_probs = grad_dropped * noise
        if ctx.needs_input_grad[1]:
            dropped3d = _batched(probs * noise)
            grad_value = dropped3d.transpose(1, 2).bmm(grad3d).reshape(ctx.value_shape)
        return grad_probs, grad_value, None


def _matmul_without_casts(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.matmul(a, b)`` would not cast: same dtype, and the autocast dtype under autocast."""
    device = a.device.type
    if a.dtype != b.dtype:
        return False
    return not torch.is_autocast_enabled(device) or a.dtype == torch.get_autocast_dtype(device)


def dropout_matmul(probs: torch.Tensor, value: torch.Tensor, p: float) -> torch.Tensor:
    """``torch.matmul(F.dropout(probs, p), value)`` in training mode, bitwise, keeping less on CPU."""
    fused = (_active_dropout(p, True) and _lean_on_cpu(probs, value) and probs.dim() >= 3
             and probs.shape[:-2] == value.shape[:-2] and probs.shape[-1] == value.shape[-2]
             and probs.numel() > 0 and value.numel() > 0 and _matmul_without_casts(probs, value))
    if fused:
        return _DropoutMatmul.apply(probs, value, p)
    return torch.matmul(dropout(probs, p), value)


def _mm_mat1_backward(grad: torch.Tensor, mat2: torch.Tensor, mat1: torch.Tensor) -> torch.Tensor:
    """Gradient of ``mat1`` in ``mat1 @ mat2`` as autograd's ``mm``/``addmm`` derivative computes it."""
    rows = mat1.shape[0]
    if mat1.stride(0) == 1 and mat1.stride(1) == rows:
        return mat2.mm(grad.t()).t()
    return grad.mm(mat2.t())


def _mm_mat2_backward(grad: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """Gradient of ``mat2`` in ``mat1 @ mat2`` as autograd's ``mm``/``addmm`` derivative computes it."""
    rows = mat2.shape[0]
    if mat2.stride(0) == 1 and mat2.stride(1) == rows:
        return grad.t().mm(mat1).t()
    return mat1.t().mm(grad)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the 2-D matrix ``F.linear`` hands to ``addmm`` (leading dimensions folded)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


class _GeluLinear(torch.autograd.Function):
    """``F.linear(F.gelu(h), weight, bias)`` keeping ``h``, not ``gelu(h)``, for backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                approximate: str) -> torch.Tensor:
        ctx.approximate = approximate
        ctx.save_for_backward(hidden, weight)
        return F.linear(F.gelu(hidden, approximate=approximate), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        activated = _rows(F.gelu(hidden, approximate=ctx.approximate))
        grad2d = grad.reshape(activated.shape[0], weight.shape[0])
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_activated = _mm_mat1_backward(grad2d, weight.t(), activated).reshape(hidden.shape)
            grad_hidden = torch.ops.aten.gelu_backward(grad_activated, hidden, approximate=ctx.approximate)
        if ctx.needs_input_grad[1]:
            grad_weight = _mm_mat2_backward(grad2d, activated, weight.t()).t()
        if ctx.needs_input_grad[2]:
            grad_bias = grad2d.sum(0, keepdim=True).view(weight.shape[0])
        return grad_hidden, grad_weight, grad_bias, None


def _gelu_linear_fits(hidden: torch.Tensor, linear: nn.Linear) -> bool:
    """``F.linear`` would run one ``addmm`` on ``gelu(hidden)``, no autocast, no hooks."""
    weight, bias = linear.weight, linear.bias
    return (not has_module_hooks(linear) and bias is not None and bias.dim() == 1 and weight.dim() == 2
            and hidden.dim() >= 2 and hidden.is_contiguous()
            and hidden.layout == torch.strided and weight.layout == torch.strided
            and hidden.numel() > 0 and hidden.dtype == weight.dtype == bias.dtype
            and not torch.is_autocast_enabled(hidden.device.type))


def gelu_linear(hidden: torch.Tensor, linear: nn.Linear, approximate: str = "none") -> torch.Tensor:
    """``linear(F.gelu(hidden))`` bitwise; on CPU backward keeps ``hidden`` only and recomputes the GELU."""
    if _gelu_linear_fits(hidden, linear) and _lean_on_cpu(hidden, linear.weight, linear.bias):
        return _GeluLinear.apply(hidden, linear.weight, linear.bias, approximate)
    return linear(F.gelu(hidden, approximate=approximate))


#: Up to this many rows, a vocabulary projection runs as ``W @ x^T`` (~2x faster on CPU; last bit may differ).
FEW_ROWS = 16


def _rows_times_table(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``rows @ weight^T + bias`` for a few 2-D ``rows``, as ``(weight @ rows^T)^T``."""
    if rows.shape[0] <= FEW_ROWS:
        out = torch.mm(weight, rows.t()) if bias is None else torch.addmm(bias[:, None], weight, rows.t())
        return out.t().contiguous()
    return F.linear(rows, weight, bias)


class _VocabularyProjection(torch.autograd.Function):
    """``F.linear`` over a vocabulary-sized weight with a fresh, contiguous weight gradient."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return _rows_times_table(rows, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, weight = ctx.saved_tensors
        grad_rows = grad.mm(weight) if ctx.needs_input_grad[0] else None
        grad_weight = grad.t().mm(rows) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_rows, grad_weight, grad_bias


def vocabulary_projection(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          ) -> torch.Tensor:
    """``F.linear`` for a (vocabulary x width) ``weight``: faster for few rows, no extra gradient buffers."""
    if torch.is_autocast_enabled(hidden.device.type):
        return F.linear(hidden, weight, bias)
    rows = hidden.reshape(-1, hidden.shape[-1])
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    out = _VocabularyProjection.apply(rows, weight, bias) if needs_grad else _rows_times_table(rows, weight, bias)
    return out.view(*hidden.shape[:-1], weight.shape[0])
