"""Named profiler scopes marking a forward's components: patch embedding, attention, FFN, token reduction, head.

``scope(name)`` is a ``torch.profiler.record_function`` range named ``vitlab::<name>`` that also keeps the open
names on a per-thread stack, so a dispatch-level counter (FLOPs, bytes) can attribute to the same component
as the profiler. The explicit forwards (``models.vit_forward``, ``tome``, ``dynamicvit``, ``vilt_pumer``) open
scopes where they run a component themselves; for timm's own modules ``component_hooks`` opens them from
module hooks on a *private copy* of a model (hooks on a cached, shared model would be a mutation).

A scope name is ``component`` or ``component/detail``: module hooks put the module's path there
(``attention/blocks.3.attn``); the detail ``matching`` marks token-reduction bookkeeping (ToMe's and PuMer's
bipartite matching), whose operators count as such whatever they are.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from torch import nn
from torch.profiler import record_function

PREFIX = "vitlab::"
EMBEDDING, ATTENTION, FFN, REDUCTION, HEAD = "patch embedding", "attention", "FFN", "token reduction", "head"
MATCHING = REDUCTION + "/matching"
COMPONENTS = (EMBEDDING, ATTENTION, FFN, REDUCTION, HEAD)

_state = threading.local()


def open_scopes() -> tuple[str, ...]:
    """The scope names open on this thread, outermost first."""
    return tuple(getattr(_state, "stack", ()))


def enter_scope(name: str) -> None:
    """Open ``vitlab::<name>`` on this thread (``exit_scope`` closes the innermost)."""
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    ranges = getattr(_state, "ranges", None)
    if ranges is None:
        ranges = _state.ranges = []
    profiler_range = record_function(PREFIX + name)
    profiler_range.__enter__()
    stack.append(name)
    ranges.append(profiler_range)


def exit_scope() -> None:
    _state.stack.pop()
    _state.ranges.pop().__exit__(None, None, None)


class scope(contextlib.ContextDecorator):
    """``with scope(ATTENTION): ...`` or ``@scope(ATTENTION)``: a profiler range ``vitlab::attention`` and an
    entry on the thread's stack. Holds no state, so one decorator serves every thread and nesting."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self):
        enter_scope(self.name)
        return self

    def __exit__(self, *exc) -> bool:
        exit_scope()
        return False


_HEAD_NAMES = ("fc_norm", "head", "conv_head", "classifier", "final_conv")
_EMBEDDING_NAMES = ("patch_embed", "stem", "conv_stem")


def module_component(path: str, module: nn.Module) -> str | None:
    """The component a timm submodule is, from its class and place: attention modules (MHSA, Swin's window
    attention, EfficientViT's cascaded group attention), MLPs, the stem / patch embedding and the head."""
    kind = type(module).__name__
    if "." not in path and path in _EMBEDDING_NAMES:
        return EMBEDDING
    if "." not in path and path in _HEAD_NAMES:
        return HEAD
    if kind.endswith("Attention"):  # timm's Attention, Swin's WindowAttention, EfficientViT's LocalWindowAttention
        return ATTENTION
    if kind.endswith("Mlp") or kind == "SwiGLU":
        return FFN
    return None


@contextlib.contextmanager
def component_hooks(model: nn.Module) -> Iterator[int]:
    """Open a ``scope`` around every component module's forward while inside; yields how many were marked.

    Only for a private copy of a model: hooks are state on the module. A component inside another component
    (EfficientViT's attention wraps a cascaded group attention) is marked once, at its outermost module.
    """
    handles, marked = [], []

    def enter(name: str):
        return lambda module, args: enter_scope(name)

    def leave(module, args, output):
        exit_scope()

    for path, module in model.named_modules():
        component = module_component(path, module)
        if component is None or any(path.startswith(p + ".") for p in marked):
            continue
        marked.append(path)
        handles.append(module.register_forward_pre_hook(enter(f"{component}/{path}")))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield len(marked)
    finally:
        for handle in handles:
            handle.remove()
