"""Routed norms (layer, RMS and batch norms, whose deltas stay dense) and folding a batch norm into the
convolution before it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergekit_lite.twin.route import Routed, folds_norm, kept, row_params, tensor_key


class RoutedLayerNorm(Routed):
    """nn.LayerNorm: normalise once, then per-row gain and bias (the shared ones plus the routed deltas)."""

    def __init__(self, shared: torch.nn.LayerNorm, weight_deltas: torch.Tensor | None,
                 bias_deltas: torch.Tensor | None) -> None:
        super().__init__(shared)
        self.register_buffer("weight_deltas", weight_deltas)  # (T, d)
        self.register_buffer("bias_deltas", bias_deltas)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route is None:
            return self.shared(x)
        norm = self.shared
        y = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
        shape = (x.shape[0], *([1] * (x.dim() - 2)), -1)
        weight = norm.weight if self.weight_deltas is None else row_params(norm.weight, self.weight_deltas, self.route)
        bias = norm.bias if self.bias_deltas is None else row_params(norm.bias, self.bias_deltas, self.route)
        weight = weight.view(shape) if weight.dim() == 2 else weight
        if bias is None:
            return y * weight
        return torch.addcmul(bias.view(shape) if bias.dim() == 2 else bias, y, weight)


class RoutedRMSNorm(Routed):
    """RMS norms (torch.nn.RMSNorm and the transformers families' own, plain or with a 1 + weight gain): the
    output is linear in the gain, so a row's update is normed(x) * (route @ weight deltas)."""

    def __init__(self, shared: torch.nn.Module, weight_deltas: torch.Tensor) -> None:
        super().__init__(shared)
        self.register_buffer("weight_deltas", weight_deltas)  # (T, d)
        eps = getattr(shared, "variance_epsilon", None) or getattr(shared, "eps", None)
        self.eps = float(eps) if eps is not None else float(torch.finfo(torch.float32).eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared(x)
        if self.route is None:
            return out
        normed = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(out.dtype)
        gains = row_params(torch.zeros_like(self.weight_deltas[0]), self.weight_deltas, self.route)
        return out + normed * gains.view(gains.shape[0], *([1] * (x.dim() - 2)), -1).to(out.dtype)


def is_rms_norm(module: torch.nn.Module) -> bool:
    """An RMS norm with a 1-D gain, recognised by class name (each transformers family defines its own)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and getattr(module, "bias", None) is None)


def _scale_shift(values: dict[str, torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode batch norm's weight, bias and running statistics as one scale and shift per channel."""
    scale = values["weight"] / torch.sqrt(values["running_var"] + eps)
    return scale, values["bias"] - values["running_mean"] * scale


class RoutedBatchNorm2d(Routed):
    """nn.BatchNorm2d in eval mode: each row gets its own statistics, gain and bias, folded into one scale and
    shift per channel."""

    NAMES = ("weight", "bias", "running_mean", "running_var")
    folded = False  # set when the conv before it applies it (top-1 rows and fixed mixes)

    def __init__(self, shared: torch.nn.BatchNorm2d, deltas: dict[str, torch.Tensor]) -> None:
        super().__init__(shared)
        for name in self.NAMES:
            self.register_buffer(f"{name}_deltas", deltas.get(name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route is None:
            return self.shared(x)
        if self.shared.training:
            raise RuntimeError("routed batch norm runs in eval mode only (per-row statistics)")
        if self.folded and folds_norm(self.route):
            return x  # the conv before it already applied each row's task norm
        norm = self.shared
        if self.route.lanes is not None:  # each lane's channels: its task's folded norm
            scale, shift = (t.reshape(-1, 1, 1) for t in self.task_scale_shift())
            return torch.addcmul(shift, x, scale)
        if self.route.uniform and norm.affine:  # one mix for the batch: its norm, formed once
            scale, shift = self.mix_scale_shift([(task, w) for task, _, w in self.route.groups])
            return torch.addcmul(shift[:, None, None], x, scale[:, None, None])
        if self.route.one_task_per_row and norm.affine:  # each row: its task's folded norm
            scale, shift = self.task_scale_shift()
            task = self.route.task_of_row()
            return torch.addcmul(shift[task][:, :, None, None], x, scale[task][:, :, None, None])
        rows = {}
        for name in self.NAMES:
            base, deltas = getattr(norm, name), getattr(self, f"{name}_deltas")
            rows[name] = base.unsqueeze(0).expand(x.shape[0], -1) if deltas is None else row_params(base, deltas, self.route)
        scale, shift = _scale_shift(rows, norm.eps)
        return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None])

    def state_key(self) -> tuple:
        norm = self.shared
        return tensor_key(norm.weight, norm.bias, norm.running_mean, norm.running_var,
                          *(getattr(self, f"{name}_deltas") for name in self.NAMES))

    def mix_scale_shift(self, mix: list[tuple[int, float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) scale and shift of the norm whose parameters are the shared ones plus sum_t w_t of the deltas (as
        each row of a soft route gets), kept for the last mix seen."""
        norm = self.shared

        def fold() -> tuple[torch.Tensor, torch.Tensor]:
            values = {}
            for name in self.NAMES:
                value, deltas = getattr(norm, name), getattr(self, f"{name}_deltas")
                for task, w in mix if deltas is not None else ():
                    value = value + w * deltas[task]
                values[name] = value
            return _scale_shift(values, norm.eps)

        return kept(self, "_mix_folded", self.state_key() + (tuple(mix),), fold)

    def task_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per task (T, C): the norm folded into one scale and shift, formed once and kept."""
        norm = self.shared

        def fold() -> tuple[torch.Tensor, torch.Tensor]:
            tasks = next(d for d in (getattr(self, f"{n}_deltas") for n in self.NAMES) if d is not None).shape[0]
            values = {}
            for name in self.NAMES:
                base, deltas = getattr(norm, name), getattr(self, f"{name}_deltas")
                values[name] = base.unsqueeze(0).expand(tasks, -1) if deltas is None else base + deltas
            return _scale_shift(values, norm.eps)

        return kept(self, "_folded", self.state_key(), fold)
