"""PLeaS: merge two models of one architecture, trained from any initialisation, to a chosen width.

1. permutation groups from the graph (graph.py), self-checked;
2. per group, correlation of A's and B's units on data, Hungarian matching (matching.py);
3. per-group ratios that meet the target compute, unmerging the worst-matched groups first;
4. per conv/linear layer, closed-form least squares from the layouts' inputs to the layouts' targets
   (least_squares.py); norms merged by layout, and their running statistics re-estimated on the data;
5. optionally, the whole merged model tuned toward the sources' combined outputs on the same inputs (tuning.py).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

import mergekit_lite.pleas.least_squares as ls
from mergekit_lite.errors import UserError
from mergekit_lite.models.loading import resize_to
from mergekit_lite.pipeline import Progress
from mergekit_lite.pleas.features import channel_axis, channel_rows
from mergekit_lite.pleas.graph import check_groups, permutation_spec
from mergekit_lite.pleas.matching import (CrossStats, Layout, allocate_ratios, block_cost, identity_layout, match,
                                          partial_layout)
from mergekit_lite.pleas.spec import Group, Layer, Spec, expand_blocks
from mergekit_lite.pleas.tuning import tune_outputs


@dataclass
class PleasOptions:
    target_width: float = 1.0  # compute relative to one source model, 1.0 .. 2.0
    ridge: float = 1e-2  # relative to the mean diagonal of each layer's Gram matrix
    norm_statistics: str = "reestimate"  # or "merge": average the running statistics like any parameter
    least_squares: bool = True  # False: permutation-only merge (matched weights averaged)
    label_spaces: str = "shared"  # "separate": the output heads predict different classes (kept side by side)
    ratio_step: float = 0.125
    device: str = "cpu"  # where the models run and the statistics accumulate (matching itself runs on the CPU)
    tune_steps: int = 0  # Adam steps of end-to-end tuning toward the combined outputs (0: none)
    tune_lr: float = 3e-4
    seed: int = 0  # the order in which tuning visits the batches


@dataclass
class PleasResult:
    model: torch.nn.Module
    report: dict = field(default_factory=dict)


def check_same_structure(spec_a: Spec, spec_b: Spec) -> None:
    if [g.members for g in spec_a.groups] != [g.members for g in spec_b.groups]:
        raise UserError("the two models do not have the same architecture (their permutation groups differ)")


def block_scores(correlation: torch.Tensor, blocks: int) -> torch.Tensor:
    """Similarity of every block of A (an attention head) with every block of B: the mean correlation of
    their units in order (units inside a block keep their order when blocks move)."""
    size = correlation.shape[0] // blocks
    return torch.diagonal(correlation.view(blocks, size, blocks, size), dim1=1, dim2=3).mean(-1)


def expand_layout(layout: Layout, group: Group, name: str, size: int) -> Layout:
    """A block group's layout (over blocks: attention heads) as unit indices along one member's axis of `size`
    in the source models. Units of a block stay in order; an axis of several sections (fused q/k/v) keeps them,
    each laid out as [merged blocks | A-only blocks | B-only blocks]."""
    if not group.blocks:
        return layout
    segments = group.segments.get(name, 1)
    units = lambda blocks: expand_blocks(blocks, size, group.width, segments)  # noqa: E731
    per_block = size // (segments * group.width)
    order = None
    if segments > 1:
        runs = [len(part) * per_block for part in (layout.merged_a, layout.only_a, layout.only_b)]
        starts = [0, segments * runs[0], segments * (runs[0] + runs[1])]
        order = torch.cat([torch.arange(run) + start + s * run for s in range(segments)
                           for start, run in zip(starts, runs)])
    return Layout(units(layout.merged_a), units(layout.merged_b), units(layout.only_a), units(layout.only_b),
                  layout.pair_correlation.repeat_interleave(per_block).repeat(segments), order)


def _cost_ratio(spec: Spec, layouts_for: Callable[[list[float]], list[Layout]], positions: dict[str, int],
                layer_layout: Callable) -> Callable[[list[float]], float]:
    """Compute (multiply-adds in non-zero blocks, and attention's scores and weighted sums per head) of the
    merged model relative to one source model."""
    base = _source_macs(spec, positions)

    def ratio(ratios: list[float]) -> float:
        layouts = layouts_for(ratios)
        total = _attention_macs(spec, positions, [layout.width for layout in layouts])
        for layer in spec.layers:
            in_layout, out_layout = layer_layout(layouts, layer, "in"), layer_layout(layouts, layer, "out")
            total += _kernel(layer.module) * block_cost(out_layout, in_layout) * positions[layer.name]
        return total / base

    return ratio


def _source_macs(spec: Spec, positions: dict[str, int]) -> int:
    """Multiply-adds of one source model: its conv/linear layers and its attention."""
    return sum(_kernel(l.module) * l.module.weight.shape[0] * l.module.weight.shape[1] * positions[l.name]
               for l in spec.layers) + _attention_macs(spec, positions, [g.width for g in spec.groups])


def _attention_macs(spec: Spec, positions: dict[str, int], widths: list[int]) -> int:
    """Multiply-adds of attention itself (query-key scores and the weighted sum of values, n^2 per query unit
    each) for head groups of the given widths in blocks."""
    total = 0
    for group, width in zip(spec.groups, widths):
        if group.attention is not None:
            layer, units = group.attention
            total += 2 * positions[layer] ** 2 * units * width
    return total


def _kernel(module: torch.nn.Module) -> int:
    return math.prod(module.weight.shape[2:]) if module.weight.dim() > 2 else 1


def _allowed(out_layout: Layout, in_layout: Layout, kernel: int, bias: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Which inputs each kind of output may read (see least_squares)."""
    out_origin = out_layout.origin()
    in_origin = in_layout.origin().repeat_interleave(kernel)
    if bias:
        in_origin = torch.cat([in_origin, torch.zeros(1, dtype=torch.long)])
    return [
        (out_origin == 0, torch.ones_like(in_origin, dtype=torch.bool)),
        (out_origin == 1, in_origin != 2),
        (out_origin == 2, in_origin != 1),
    ]


@torch.no_grad()
def reestimate_norm_statistics(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Batch-norm running mean and variance recomputed as plain averages over the data."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    device = next(model.parameters()).device
    for batch in batches:
        model(batch.to(device))
    for m, momentum in saved:
        m.momentum = momentum
    model.eval()


def _stepped(items, progress, label: str):
    """`items` one by one, with a step progress bar (count and ETA) when a progress display is given."""
    if progress is None:
        yield from items
        return
    items = list(items)
    progress.start(len(items), 0, label)
    try:
        for item in items:
            yield item
            progress.advance(0)
    finally:
        progress.stop()


@dataclass
class Placement:
    """Where each conv/linear layer's input and output channels go in the merged model: the layout of the group
    on that side, or a frozen space (the model input is shared; an output head is averaged for one label space,
    or kept side by side for different ones, the merged head then predicting over the union)."""

    spec: Spec
    heads_b: dict[str, int]  # layer name -> model B's output width (a head may differ from A's)
    label_spaces: str
    layouts: list[Layout] = field(default_factory=list)  # per group, once the ratios are chosen

    def of(self, layouts: list[Layout], layer: Layer, side: str) -> Layout:
        index = layer.input_group if side == "in" else layer.output_group
        if index is None:
            if side == "in":
                return identity_layout(layer.module.weight.shape[1])
            return _head_layout(layer.module.weight.shape[0], self.heads_b[layer.name], self.label_spaces)
        size = layer.module.weight.shape[1 if side == "in" else 0]
        return expand_layout(layouts[index], self.spec.groups[index], f"{layer.name}.weight", size)

    def inputs(self, layer: Layer) -> Layout:
        return self.of(self.layouts, layer, "in")

    def outputs(self, layer: Layer) -> Layout:
        return self.of(self.layouts, layer, "out")


def pleas_merge(model_a: torch.nn.Module, model_b: torch.nn.Module, batches: list[torch.Tensor],
                options: PleasOptions | None = None, log: Callable[[str], None] = lambda message: None,
                progress: Progress | None = None) -> PleasResult:
    """Merge two models of one architecture; `batches` feed the matching and the least squares. The phases:
    correlate units, match them, choose per-group ratios for the target compute, solve (or average) every layer,
    merge the rest by layout, re-estimate norms, tune."""
    options = options or PleasOptions()
    if not 1.0 <= options.target_width <= 2.0:
        raise UserError(f"target_width must be between 1.0 and 2.0, not {options.target_width}")
    device = torch.device(options.device)
    model_a, model_b = model_a.eval().to(device), model_b.eval().to(device)
    batches = [batch.to(device) for batch in batches]
    spec, spec_b = permutation_spec(model_a), permutation_spec(model_b)
    check_same_structure(spec, spec_b)
    check_error = check_groups(model_a, spec, batches[0][:8])
    log(f"{len(spec.groups)} permutation groups, {len(spec.layers)} conv/linear layers (self-check {check_error:.1e})")

    correlations, positions = _correlations(spec, spec_b, batches, device, progress, log)
    widths = [c.shape[0] for c in correlations]
    log(f"matching: {len(correlations)} assignment problems, largest {max(widths, default=0)} x "
        f"{max(widths, default=0)} (Hungarian, cubic in the size)")
    pairs = [match(c) for c in _stepped(correlations, progress, "matching (assignment problems)")]
    qualities = [c[torch.as_tensor(p[0]), torch.as_tensor(p[1])] for c, p in zip(correlations, pairs)]

    def layouts_for(ratios: list[float]) -> list[Layout]:
        return [partial_layout(c, p, r) for c, p, r in zip(correlations, pairs, ratios)]

    placement = Placement(spec, {l.name: l.module.weight.shape[0] for l in spec_b.layers}, options.label_spaces)
    compute = _cost_ratio(spec, layouts_for, positions, placement.of)
    ratios = allocate_ratios(qualities, compute, options.target_width, options.ratio_step)
    placement.layouts = layouts_for(ratios)
    log(f"ratios chosen for compute {options.target_width}: achieved {compute(ratios):.3f}")

    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if options.least_squares:
        merged, residuals = _solved_layers(spec, spec_b, batches, placement, state_a, state_b, options.ridge,
                                           device, progress, log)
    else:
        merged, residuals = _averaged_layers(spec, placement, state_a, state_b), {}
    _merge_the_rest(spec, placement.layouts, state_a, state_b, merged)
    model = resize_to(copy.deepcopy(model_a), merged)
    model.load_state_dict(merged)
    if options.norm_statistics == "reestimate":
        reestimate_norm_statistics(model, batches)
    model.eval()
    tuning = None
    if options.tune_steps > 0:
        head = next((placement.outputs(l) for l in spec.layers if l.output_group is None), None)
        if head is None:
            raise UserError("PLeaS tuning needs an output layer outside every permutation group")
        tuning = tune_outputs(model, model_a, model_b, batches, head, options.tune_steps, options.tune_lr,
                              seed=options.seed, log=log, progress=progress)
    report = _report(spec, placement, positions, ratios, qualities, compute(ratios), state_a, merged, residuals,
                     options, check_error, tuning)
    return PleasResult(model, report)


def _correlations(spec: Spec, spec_b: Spec, batches: list[torch.Tensor], device: torch.device,
                  progress: Progress | None, log: Callable[[str], None]) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Per group, the correlation between A's and B's units (or blocks of units) over the batches; and per layer
    the number of output positions an input row gives (for the compute count)."""
    stats: list[CrossStats | None] = [None] * len(spec.groups)
    group_nodes = {name for g in spec.groups for name in g.nodes}
    layer_nodes = {l.node for l in spec.layers}
    positions: dict[str, int] = {}
    log(f"features: {len(batches)} batches ({sum(len(b) for b in batches)} inputs) through both models")
    for batch in _stepped(batches, progress, "features (batches through both models)"):
        acts_a = spec.activations(batch, group_nodes | layer_nodes)
        acts_b = spec_b.activations(batch, group_nodes | layer_nodes)
        for group in spec.groups:
            for node in group.nodes:
                rows_a, rows_b = channel_rows(acts_a[node]), channel_rows(acts_b[node])
                if stats[group.index] is None:
                    stats[group.index] = CrossStats.empty(rows_a.shape[1], device)
                stats[group.index].add(rows_a, rows_b)
        if not positions:
            positions = {l.name: acts_a[l.node][0].numel() // l.module.weight.shape[0] for l in spec.layers}
        del acts_a, acts_b
    correlations = [(block_scores(s.correlation(), g.width) if g.blocks else s.correlation()).cpu()
                    for g, s in zip(spec.groups, stats)]
    return correlations, positions


def _solved_layers(spec: Spec, spec_b: Spec, batches: list[torch.Tensor], placement: Placement,
                   state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor], ridge: float,
                   device: torch.device, progress: Progress | None,
                   log: Callable[[str], None]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every conv/linear layer's merged weight by least squares: inputs and targets of both models in the
    merged layout, only the weights the layout allows, the lifted sources' sum as the ridge's prior."""
    normals: dict[str, ls.Normal] = {}
    inputs_of = {l.name: spec.layer_input(l) for l in spec.layers}
    wanted = {l.node for l in spec.layers} | set(inputs_of.values())
    log(f"least squares: {len(batches)} batches for the normal equations of {len(spec.layers)} layers, then "
        f"{len(spec.layers)} solves")
    for batch in _stepped(batches, progress, "least squares: normal equations (batches)"):
        acts_a = spec.activations(batch, wanted)
        acts_b = spec_b.activations(batch, wanted)
        for layer in spec.layers:
            module = layer.module
            in_layout, out_layout = placement.inputs(layer), placement.outputs(layer)
            x_a, x_b = acts_a[inputs_of[layer.name]], acts_b[inputs_of[layer.name]]
            y_a, y_b = acts_a[layer.node], acts_b[layer.node]
            x = ls.patches(module, in_layout.combine(x_a, x_b, channel_axis(x_a)))
            if module.bias is not None:
                x = ls.with_bias_column(x)
            y = ls.output_rows(module, out_layout.combine(y_a, y_b, channel_axis(y_a)))
            if layer.name not in normals:
                normals[layer.name] = ls.Normal.empty(x.shape[1], y.shape[1], device)
            normals[layer.name].add(x, y)
    merged: dict[str, torch.Tensor] = {}
    residuals: dict[str, float] = {}
    for layer in _stepped(spec.layers, progress, "least squares: solves (layers)"):
        module = layer.module
        in_layout, out_layout = placement.inputs(layer), placement.outputs(layer)
        allowed = _allowed(out_layout, in_layout, _kernel(module), module.bias is not None)
        prior = sum(_lift_weight(state[f"{layer.name}.weight"], side, out_layout, in_layout)
                    for side, state in (("a", state_a), ("b", state_b))).reshape(out_layout.width, -1).T
        if module.bias is not None:
            bias = out_layout.combine(state_a[f"{layer.name}.bias"], state_b[f"{layer.name}.bias"], 0)
            prior = torch.cat([prior, bias.unsqueeze(0)])
        weights, residuals[layer.name] = ls.solve(normals.pop(layer.name), allowed, ridge, prior)
        body = weights[:-1] if module.bias is not None else weights
        shape = (out_layout.width, in_layout.width, *module.weight.shape[2:])
        merged[f"{layer.name}.weight"] = body.T.reshape(shape).float()
        if module.bias is not None:
            merged[f"{layer.name}.bias"] = weights[-1].float()
    return merged, residuals


def _averaged_layers(spec: Spec, placement: Placement, state_a: dict[str, torch.Tensor],
                     state_b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Permutation only: every conv/linear layer's matched weights averaged, private units kept."""
    merged: dict[str, torch.Tensor] = {}
    for layer in spec.layers:
        in_layout, out_layout = placement.inputs(layer), placement.outputs(layer)
        name = f"{layer.name}.weight"
        merged[name] = sum(_lift_weight(state[name], side, out_layout, in_layout)
                           for side, state in (("a", state_a), ("b", state_b)))
        if f"{layer.name}.bias" in state_a:
            merged[f"{layer.name}.bias"] = out_layout.combine(state_a[f"{layer.name}.bias"],
                                                              state_b[f"{layer.name}.bias"], 0)
    return merged


def _merge_the_rest(spec: Spec, layouts: list[Layout], state_a: dict[str, torch.Tensor],
                    state_b: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> None:
    """Norms and every other tensor not yet in `merged`: combined by its group's layout, else averaged;
    non-float tensors copied from A."""
    group_of_member = {name: (g, axis) for g in spec.groups for name, axis in g.members}
    for name, value in state_a.items():
        if name in merged:
            continue
        if not value.is_floating_point():
            merged[name] = value.clone()
        elif name in group_of_member:
            group, axis = group_of_member[name]
            layout = expand_layout(layouts[group.index], group, name, value.shape[axis])
            merged[name] = layout.combine(value, state_b[name], axis)
            if name in spec.halve_private:
                half = 1.0 - 0.5 * (layout.origin() > 0).to(value.dtype).to(value.device)
                merged[name] = merged[name] * half.view(-1, *([1] * (value.dim() - axis - 1)))
        else:
            merged[name] = (value + state_b[name]) / 2


def _report(spec: Spec, placement: Placement, positions: dict[str, int], ratios: list[float],
            qualities: list[torch.Tensor], compute_ratio: float, state_a: dict[str, torch.Tensor],
            merged: dict[str, torch.Tensor], residuals: dict[str, float], options: PleasOptions,
            check_error: float, tuning: dict | None) -> dict:
    """The `pleas` section of the report: ratios achieved, per group and per layer figures, tuning."""
    layouts = placement.layouts
    dense = sum(_kernel(l.module) * placement.outputs(l).width * placement.inputs(l).width * positions[l.name]
                for l in spec.layers) + _attention_macs(spec, positions, [layout.width for layout in layouts])
    params_a = sum(v.numel() for v in state_a.values() if v.is_floating_point())
    params_merged = sum(v.numel() for v in merged.values() if v.is_floating_point())
    heads = [placement.outputs(l) for l in spec.layers if l.output_group is None]
    return {
        "target_width": options.target_width,
        "compute_ratio": compute_ratio,
        "dense_compute_ratio": dense / _source_macs(spec, positions),
        "parameter_ratio": params_merged / params_a,
        "least_squares": options.least_squares,
        "outputs": {"from_a": heads[0].merged + len(heads[0].only_a) if heads else None,
                    "from_b": len(heads[0].only_b) if heads else None,
                    "label_spaces": "shared" if all(h.merged for h in heads) else "separate"},
        "norm_statistics": options.norm_statistics,
        "self_check_error": check_error,
        "groups": [
            {"group": g.index, "kind": "heads" if g.blocks else "units", "width": g.width,
             "merged_width": layouts[g.index].width, "ratio": ratios[g.index],
             "merged_pairs": layouts[g.index].merged,
             "match_quality": float(qualities[g.index].mean()),
             "merged_pair_quality": (float(layouts[g.index].pair_correlation.mean()) if layouts[g.index].merged
                                     else None),
             "members": len(g.members)}
            for g in spec.groups
        ],
        "layers": [{"layer": l.name, "residual": residuals.get(l.name)} for l in spec.layers],
        "tuning": tuning,
    }


def _lift_weight(weight: torch.Tensor, side: str, out_layout: Layout, in_layout: Layout) -> torch.Tensor:
    """One model's weight placed in the merged layout: rows of merged outputs at half weight (the merged
    output is the mean of both models'), its own private rows whole, the other model's rows and columns zero."""
    def axis_plan(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        own = layout.merged_a if side == "a" else layout.merged_b
        private = layout.only_a if side == "a" else layout.only_b
        index = torch.cat([own, private if side == "a" else torch.zeros_like(layout.only_a),
                           private if side == "b" else torch.zeros_like(layout.only_b)])
        present = torch.cat([torch.ones(len(own)), torch.full((len(layout.only_a),), float(side == "a")),
                             torch.full((len(layout.only_b),), float(side == "b"))])
        return index, present

    rows, row_present = axis_plan(out_layout)
    cols, col_present = axis_plan(in_layout)
    row_scale = row_present * torch.cat([torch.full((out_layout.merged,), 0.5),
                                         torch.ones(len(out_layout.only_a) + len(out_layout.only_b))])
    if out_layout.order is not None:
        rows, row_scale = rows[out_layout.order], row_scale[out_layout.order]
    if in_layout.order is not None:
        cols, col_present = cols[in_layout.order], col_present[in_layout.order]
    on = lambda t: t.to(weight.device)  # noqa: E731
    lifted = weight.index_select(0, on(rows)).index_select(1, on(cols))
    extra = [1] * (weight.dim() - 2)
    return lifted * on(row_scale).view(-1, 1, *extra) * on(col_present).view(1, -1, *extra)


def _head_layout(width_a: int, width_b: int, label_spaces: str) -> Layout:
    """An output head's layout: averaged when both models predict the same classes, else side by side."""
    if width_a == width_b and label_spaces == "shared":
        return identity_layout(width_a)
    empty = torch.zeros(0, dtype=torch.long)
    return Layout(empty, empty, torch.arange(width_a), torch.arange(width_b), torch.zeros(0))
