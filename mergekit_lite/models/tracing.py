"""Tracing a model with torch.fx, timm's untraceable parts kept opaque."""

from __future__ import annotations

import torch
import torch.fx


def trace(model: torch.nn.Module) -> torch.fx.GraphModule:
    """torch.fx's tracer; for timm models whose code checks traced shapes (ViTs), timm's own list of functions
    and modules to keep opaque, so tracing gets through (what stays opaque is then frozen)."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as first:  # torch.fx raises TraceError, TypeError and others on untraceable code
        try:
            from timm.models._features_fx import (
                get_notrace_functions,
                get_notrace_modules,
            )
        except ImportError:
            raise first from None
        opaque = tuple(get_notrace_modules())

        class _TimmTracer(torch.fx.Tracer):
            def is_leaf_module(self, module: torch.nn.Module, name: str) -> bool:
                return isinstance(module, opaque) or super().is_leaf_module(module, name)

        tracer = _TimmTracer(autowrap_functions=tuple(get_notrace_functions()))
        return torch.fx.GraphModule(model, tracer.trace(model))
