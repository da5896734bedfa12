"""Row-sparse optimizers for the class centers: only the rows sampled in a step move.

``PartialFCLoss(..., sparse_grad=True)`` gives its weight a row-sparse gradient (a sparse COO
tensor holding the sampled rows, like ``nn.Embedding(sparse=True)``): no dense ``[C, D]``
gradient is allocated. :class:`SparseSGD` and :class:`SparseAdamW` apply ``torch.optim.SGD`` and
``torch.optim.AdamW`` to those rows only, in one pass (one Triton kernel on CUDA, ``index_*`` ops
elsewhere)::

    loss_fn = PartialFCLoss(512, 20_000_000, sample_rate=0.1, sparse_grad=True)
    center_optimizer = SparseSGD(loss_fn.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

They are ``torch.optim.Optimizer`` subclasses, so LR schedulers, ``GradScaler`` (unscaling, and
skipping the step on inf/NaN), ``zero_grad``, gradient accumulation, ``state_dict`` and
``load_state_dict`` work as with any optimizer. Dense gradients are accepted too (every row moves).

Lazy semantics: a row absent from the gradient keeps its weight and its state bitwise unchanged,
so momentum, Adam moments and weight decay act on a row only in the steps that sample it (the
semantics of insightface's first PartialFC, which its dense-optimizer successor lost). Each of the
``C`` rows therefore sees its own sequence of updates; in particular AdamW's bias correction uses
each row's own update count (``state["row_step"]``, int32 [C]): a row's moments average only the
gradients it received, so the correction for a row first sampled at step 1000 must be the one of
its first update, not of step 1000 (which would be none, and make that first update ~3x too large).
With every row in every gradient (sample rate 1) both optimizers equal their ``torch.optim`` twins.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .validation import TRITON_DTYPES


def _rows_of(grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(rows, values [M, D])`` of a gradient: the rows of a sparse one (coalesced), all rows
    (``None``) of a dense one."""
    if not grad.is_sparse:
        return None, grad if grad.stride(-1) == 1 else grad.contiguous()
    if grad.sparse_dim() != 1 or grad.dense_dim() != 1:
        raise ValueError("a sparse gradient must hold whole rows of a [N, D] weight (sparse_dim 1, dense_dim 1), "
                         f"got sparse_dim {grad.sparse_dim()} and dense_dim {grad.dense_dim()}")
    rows = grad._indices()[0]
    if not grad.is_coalesced() and not bool((rows[1:] > rows[:-1]).all()):
        # Accumulated gradients (or any with repeated rows): sum the repeats. The loss's own
        # gradient has strictly increasing rows, and autograd only drops its coalesced flag.
        grad = grad.coalesce()
        rows = grad._indices()[0]
    return rows, grad._values().contiguous()


#: Elements of one block of rows in the torch path: its temporaries stay in cache and are reused,
#: instead of [M, D]-sized ones that the allocator maps and faults in afresh every step.
_TORCH_BLOCK_ELEMENTS = 1 << 18

Rows = torch.Tensor | slice  # rows of the weight: ids (sparse gradient), or a range (dense gradient)


def _row_blocks(rows: torch.Tensor | None, num_rows: int, dim: int):
    """``(rows of the weight, positions in the gradient)`` of blocks of at most
    ``_TORCH_BLOCK_ELEMENTS`` elements."""
    size = max(1, _TORCH_BLOCK_ELEMENTS // dim)
    for start in range(0, num_rows, size):
        positions = slice(start, min(start + size, num_rows))
        yield (positions if rows is None else rows[positions]), positions


def _gather(tensor: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The rows of ``tensor``: a view for a range (updates in place), a copy for ids."""
    return tensor[rows] if isinstance(rows, slice) else tensor.index_select(0, rows)


def _scatter_(tensor: torch.Tensor, rows: Rows, values: torch.Tensor) -> None:
    """Write ``values`` to the rows of ``tensor`` (nothing to do for a view of them)."""
    if isinstance(rows, slice):
        if values.data_ptr() != tensor[rows].data_ptr():
            tensor[rows] = values
    else:
        tensor.index_copy_(0, rows, values.to(tensor.dtype))


class _RowSparseOptimizer(torch.optim.Optimizer):
    """Shared parts: 2-D parameters, the choice between the Triton kernel and the torch ops, and
    the ``step`` loop over parameters that have a gradient."""

    def __init__(self, params: Iterable, defaults: dict[str, Any], fused: bool | None) -> None:
        for name in ("lr", "weight_decay"):
            if not defaults[name] >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {defaults[name]}")
        super().__init__(params, defaults)
        self.fused = fused
        for group in self.param_groups:
            for param in group["params"]:
                if param.dim() != 2:
                    raise ValueError(f"{type(self).__name__} updates rows of [N, D] parameters (class centers), "
                                     f"got a parameter of shape {tuple(param.shape)}")

    def _use_kernel(self, param: torch.Tensor) -> bool:
        """The Triton kernel for CUDA parameters (``fused=None``), or as ``fused`` says."""
        if self.fused is None:
            return param.is_cuda
        if self.fused and not (param.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise RuntimeError("fused=True needs CUDA parameters (or TRITON_INTERPRET=1 set before fastpfc is "
                               "imported, to run the kernel on the CPU); use fused=None or False on the CPU")
        if self.fused and param.dtype not in TRITON_DTYPES:
            raise TypeError(f"fused=True updates fp32/fp16/bf16 parameters, got {param.dtype}; use fused=False")
        return self.fused

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update the rows of each parameter that its gradient holds; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                rows, grad = _rows_of(param.grad)
                if grad.shape[0] == 0:
                    continue
                grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
                state = self._state(param, group)
                if self._use_kernel(param):
                    self._kernel_update(param, rows, grad, group, state)
                    continue
                for block_rows, positions in _row_blocks(rows, grad.shape[0], grad.shape[1]):
                    self._torch_update(param, block_rows, grad[positions], group, state)
        return loss

    def _state(self, param: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
        """The parameter's state, created on its first update."""
        raise NotImplementedError

    def _kernel_update(self, param: torch.Tensor, rows: torch.Tensor | None, grad: torch.Tensor, group: dict,
                       state: dict[str, torch.Tensor]) -> None:
        """The update by the Triton kernel, over all rows at once (``rows`` ``None``: every row)."""
        raise NotImplementedError

    def _torch_update(self, param: torch.Tensor, rows: Rows, grad: torch.Tensor, group: dict,
                      state: dict[str, torch.Tensor]) -> None:
        """The update by torch ops, of one block of rows."""
        raise NotImplementedError


def _state_like(param: torch.Tensor) -> torch.Tensor:
    """Zeros of the parameter's shape and layout, fp32 at least (fp64 for fp64 parameters)."""
    return torch.zeros_like(param, dtype=torch.promote_types(param.dtype, torch.float32),
                            memory_format=torch.preserve_format)


class SparseSGD(_RowSparseOptimizer):
    """``torch.optim.SGD`` (momentum, weight decay, Nesterov; no dampening) on the rows present in
    each gradient; the others keep their weight and momentum.

    Args:
        params: [N, D] parameters (e.g. ``PartialFCLoss.parameters()``), or parameter groups.
        lr, momentum, weight_decay, nesterov: as in ``torch.optim.SGD``. Weight decay (L2, added
            to the gradient) applies to a row when it is updated.
        fused: ``None`` runs the Triton kernel for CUDA parameters and ``index_*`` ops otherwise;
            ``True`` / ``False`` force one.

    State per parameter: ``momentum_buffer`` (fp32, like the parameter), created at the first step.
    A row's buffer starts at zero, so its first update uses its gradient, as torch's does.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, fused: bool | None = None) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov needs a momentum > 0")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov}
        super().__init__(params, defaults, fused)

    def _state(self, param, group):
        state = self.state[param]
        if group["momentum"] != 0.0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = _state_like(param)
        return state

    def _kernel_update(self, param, rows, grad, group, state) -> None:
        from .kernels.row_update import sgd_rows_
        sgd_rows_(param, grad, rows, state.get("momentum_buffer"), float(group["lr"]), group["momentum"],
                  group["weight_decay"], group["nesterov"])

    def _torch_update(self, param, rows, grad, group, state) -> None:
        lr, momentum, weight_decay = float(group["lr"]), group["momentum"], group["weight_decay"]
        w = _gather(param, rows).to(grad.dtype)
        step = grad.add(w, alpha=weight_decay) if weight_decay else grad
        if momentum != 0.0:
            velocity = _gather(state["momentum_buffer"], rows).mul_(momentum).add_(step)
            _scatter_(state["momentum_buffer"], rows, velocity)
            step = step.add(velocity, alpha=momentum) if group["nesterov"] else velocity
        _scatter_(param, rows, w.sub_(step, alpha=lr))


class SparseAdamW(_RowSparseOptimizer):
    """``torch.optim.AdamW`` on the rows present in each gradient; the others keep their weight,
    moments and update count. Bias correction counts each row's own updates (see the module
    docstring).

    Args:
        params: [N, D] parameters, or parameter groups.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (decoupled weight decay, applied
            to a row when it is updated).
        fused: as in :class:`SparseSGD`.

    State per parameter, created at the first step: ``exp_avg`` and ``exp_avg_sq`` (fp32, like the
    parameter) and ``row_step`` (int32 [N]).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, fused: bool | None = None) -> None:
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}, fused)

    def _state(self, param, group):
        state = self.state[param]
        if "row_step" not in state:
            state["exp_avg"], state["exp_avg_sq"] = _state_like(param), _state_like(param)
            state["row_step"] = torch.zeros(param.shape[0], dtype=torch.int32, device=param.device)
        return state

    def _kernel_update(self, param, rows, grad, group, state) -> None:
        from .kernels.row_update import adamw_rows_
        adamw_rows_(param, grad, rows, state["exp_avg"], state["exp_avg_sq"], state["row_step"], float(group["lr"]),
                    *group["betas"], group["eps"], group["weight_decay"])

    def _torch_update(self, param, rows, grad, group, state) -> None:
        lr, (beta1, beta2), eps, weight_decay = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        row_step = _gather(state["row_step"], rows).add_(1)
        _scatter_(state["row_step"], rows, row_step)
        exp_avg = _gather(state["exp_avg"], rows).lerp_(grad, 1.0 - beta1)
        exp_avg_sq = _gather(state["exp_avg_sq"], rows).mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        _scatter_(state["exp_avg"], rows, exp_avg)
        _scatter_(state["exp_avg_sq"], rows, exp_avg_sq)
        steps = row_step.to(grad.dtype)[:, None]
        bias1, bias2 = 1.0 - beta1 ** steps, 1.0 - beta2 ** steps
        w = _gather(param, rows).to(grad.dtype).mul_(1.0 - lr * weight_decay)
        update = exp_avg.div(exp_avg_sq.sqrt().div_(bias2.sqrt()).add_(eps)).mul_(lr / bias1)
        _scatter_(param, rows, w.sub_(update))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, which casts every state tensor but
        ``step`` to the parameter's dtype: the update counts are restored as int32."""
        saved = {key: value["row_step"] for key, value in state_dict["state"].items() if "row_step" in value}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            if saved_id in saved:
                self.state[param]["row_step"] = saved[saved_id].to(torch.int32, copy=True).to(param.device)
