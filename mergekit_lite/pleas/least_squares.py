"""Closed-form least squares for one layer of the merged model, with the zero-block constraint.

For a conv or linear layer the merged weights minimise ||X W - Y||^2 + ridge ||W||^2 over the layer's
inputs X (convolution patches unfolded into rows, a column of ones for the bias) and target outputs Y, both
in the merged layout. Only the Gram matrices X^T X and X^T Y are accumulated, so memory does not grow with
the number of samples. Outputs kept from A alone may read only merged and A-only inputs (and likewise for
B), so the two models' private units never mix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def patches(module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The rows a layer multiplies by its weight: unfolded patches for a conv, feature rows for a linear."""
    if isinstance(module, torch.nn.Conv2d):
        cols = torch.nn.functional.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=module.padding,
                                          stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if isinstance(module, torch.nn.Conv1d):
        cols = torch.nn.functional.unfold(inputs.unsqueeze(-1), (module.kernel_size[0], 1),
                                          dilation=(module.dilation[0], 1), padding=(module.padding[0], 0),
                                          stride=(module.stride[0], 1))
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return inputs.reshape(-1, inputs.shape[-1])


def output_rows(module: torch.nn.Module, outputs: torch.Tensor) -> torch.Tensor:
    if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv1d)):
        return outputs.transpose(1, -1).reshape(-1, outputs.shape[1]) if outputs.dim() == 3 else \
            outputs.permute(0, 2, 3, 1).reshape(-1, outputs.shape[1])
    return outputs.reshape(-1, outputs.shape[-1])


@dataclass
class Normal:
    """Accumulated normal equations of one layer."""

    gram: torch.Tensor  # X^T X, (p, p)
    cross: torch.Tensor  # X^T Y, (p, out)
    target_sq: torch.Tensor  # sum of Y^2 per output, (out,)
    rows: int = 0

    @classmethod
    def empty(cls, inputs: int, outputs: int, device: torch.device | str = "cpu") -> "Normal":
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(zeros(inputs, inputs), zeros(inputs, outputs), zeros(outputs))

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.gram += x.T @ x
        self.cross += x.T @ y
        self.target_sq += (y * y).sum(0)
        self.rows += x.shape[0]


def with_bias_column(rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], dim=1)


def solve(normal: Normal, allowed: list[tuple[torch.Tensor, torch.Tensor]], ridge: float,
          prior: torch.Tensor) -> tuple[torch.Tensor, float]:
    """W (p, out) minimising ||XW - Y||^2 + ridge ||W - prior||^2, where for each (output mask, input mask)
    in `allowed` those outputs read only those inputs (the others' weights are zero). The ridge pulls towards
    `prior` (the permutation-aligned average of the two models), so directions the data never excites (a unit
    that is never active on it) keep the models' own weights instead of collapsing to zero. Returns W and the
    relative residual ||XW - Y||^2 / ||Y||^2."""
    p, out = normal.cross.shape
    device = normal.gram.device
    weights = torch.zeros(p, out, dtype=torch.float64, device=device)
    prior = prior.to(device=device, dtype=torch.float64)
    scale = float(normal.gram.diagonal().mean()) or 1.0
    for outputs, inputs in allowed:
        if not outputs.any() or not inputs.any():
            continue
        index, columns = inputs.nonzero().squeeze(1).to(device), outputs.nonzero().squeeze(1).to(device)
        gram = normal.gram[index][:, index]
        gram = gram + ridge * scale * torch.eye(len(index), dtype=torch.float64, device=device)
        rhs = normal.cross[index][:, columns] + ridge * scale * prior[index][:, columns]
        solution = torch.linalg.solve(gram, rhs)
        weights[index.unsqueeze(1), columns.unsqueeze(0)] = solution
    fitted = (weights * (normal.gram @ weights)).sum() - 2 * (weights * normal.cross).sum() + normal.target_sq.sum()
    residual = float(fitted.clamp_min(0) / normal.target_sq.sum().clamp_min(1e-30))
    return weights, residual
