"""Directional derivatives (Jacobian-vector products) of functions of named parameters.

``fn(params) -> tuple of tensors`` is differentiated at ``primals`` along ``tangents`` (both
``{name: tensor}``): :func:`jvp` by forward mode (``torch.func.jvp``) or by reverse mode
(:func:`double_backward_jvp`, for ops without forward-mode formulas). Both give ``J v``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

JVPMethod = Literal["jvp", "double_backward"]


def jvp(
    fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
    primals: dict[str, torch.Tensor],
    tangents: dict[str, torch.Tensor],
    method: JVPMethod = "jvp",
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``(fn(primals), J v)`` with ``v = tangents``, by forward mode (``jvp``) or reverse mode
    (``double_backward``)."""
    if method == "jvp":
        return torch.func.jvp(fn, (primals,), (tangents,))
    if method == "double_backward":
        return double_backward_jvp(fn, primals, tangents)
    raise ValueError(f"method must be jvp or double_backward, not {method!r}.")


def double_backward_jvp(
    fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]],
    primals: dict[str, torch.Tensor],
    tangents: dict[str, torch.Tensor],
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """``(fn(primals), J v)`` by reverse mode: ``g(u) = J^T u`` is linear in ``u``, so
    ``d<g(u), v>/du = J v``. Outputs are detached; non-finite outputs contribute no gradient; an
    output that does not depend on the parameters gets a zero derivative."""
    params = {k: p.detach().requires_grad_(True) for k, p in primals.items()}
    with torch.enable_grad():
        outs = fn(params)
        us = [torch.zeros_like(o, requires_grad=True) for o in outs]
        keys = list(params)
        safe = [torch.where(torch.isfinite(o), o, torch.zeros_like(o)) for o in outs]
        grads = torch.autograd.grad(safe, [params[k] for k in keys], us, create_graph=True, allow_unused=True)
        pairs = [(g, tangents[k]) for g, k in zip(grads, keys, strict=True) if g is not None]
        dot = sum((g * t).sum() for g, t in pairs)
        jv = torch.autograd.grad(dot, us, allow_unused=True)
    return (
        tuple(o.detach() for o in outs),
        tuple(torch.zeros_like(o) if j is None else j.detach() for o, j in zip(outs, jv, strict=True)),
    )
