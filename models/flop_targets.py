"""A token-reduction setting picked for a target FLOP ratio: the paper's baselines "configured to a similar speed-up".

PuMer's paper sets ToMe (and DynamicViT) on ViLT and METER to a speed-up similar to PuMer's. Here a baseline's
``flop_ratio`` setting (``NAME@tome_flops=0.6``) picks the merge count r (or EViT's keep rate) whose forward has
the counted FLOPs closest to that share of the unreduced forward's. FLOPs are counted with torch's
``FlopCounterMode`` (what ``analysis.timing.flops`` wraps) over the forward's own submodule calls run on a *meta*
copy of the model: the copy shares no memory with the model (its tensors have shapes, no data) and never touches
it. Meta tensors run through Python reference kernels (about a millisecond per operator), too slow to count whole
forwards for every candidate, so each part of a layer is counted on its own: a part whose FLOPs are a quadratic in
its token count (attention, MLP, a fusion block: linear layers ~ N, attention ~ N^2) is counted at three counts
and fitted (``Quadratic``, exact for these), ToMe's matching is counted at each count it meets; the baselines'
modules add the parts up along the same token schedule their forwards follow (a test checks the sum against the
counter run over the real forward). Counts are kept per model, input size and method while the model lives, for a
reference question of ``REFERENCE_TEXT_TOKENS`` tokens (the throughput harness's synthetic question), so one
variant name means one r for every question of a dataset.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

REFERENCE_TEXT_TOKENS = 11  # CLS + 9 words + SEP, as analysis.timing.runners.vqa_inputs

_LOCK = threading.Lock()
_META: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()
_TABLES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def meta_copy(module: nn.Module) -> nn.Module:
    """``module``'s structure with every parameter and buffer replaced by a meta tensor of the same shape (nothing
    is copied but the module tree); cached per module while it lives."""
    with _LOCK:
        cached = _META.get(module)
        if cached is None:
            memo: dict[int, Any] = {}
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                meta = torch.empty_like(tensor, device="meta")
                memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
            cached = _META[module] = copy.deepcopy(module, memo)
        return cached


def counted_flops(run: Callable[[], Any]) -> float:
    """FLOPs (2 per multiply-add) that torch's FlopCounterMode counts while ``run()`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class Quadratic:
    """FLOPs as ``a + b * n + c * n^2`` of a token count n, fitted exactly to counts at three n."""

    a: float
    b: float
    c: float

    @classmethod
    def counted(cls, flops_at: Callable[[int], float], points: tuple[int, int, int] = (4, 8, 16)) -> "Quadratic":
        c, b, a = np.polyfit(np.asarray(points, dtype=np.float64), [flops_at(n) for n in points], 2)
        return cls(float(a), float(b), float(c))

    def __call__(self, n: int) -> float:
        return self.a + self.b * n + self.c * n * n


def meta_tokens(count: int, width: int) -> torch.Tensor:
    """A batch of one sequence of ``count`` tokens on the meta device."""
    return torch.zeros(1, count, width, device="meta")


def closest_setting(values: Sequence, flops: Callable[[Any], float], target: float) -> Any:
    """The value of ``values`` (ordered so that FLOPs never increase along them, the neutral one first) whose
    ``flops(value)`` is closest to ``target``; a binary search, so few values are counted."""
    low, high = 0, len(values) - 1
    if flops(values[high]) > target:
        return values[high]
    while low < high:  # the first value at or under the target
        middle = (low + high) // 2
        if flops(values[middle]) <= target:
            high = middle
        else:
            low = middle + 1
    if low == 0:
        return values[0]
    above, below = values[low - 1], values[low]
    return above if abs(flops(above) - target) < abs(flops(below) - target) else below


def kept_per_model(model: nn.Module, key: tuple, build: Callable[[nn.Module], Any]) -> Any:
    """``build(meta copy of model)``, computed once per model and ``key`` (kept while the model lives)."""
    with _LOCK:
        table = _TABLES.setdefault(model, {})
    if key not in table:
        with uncounted(), torch.inference_mode():
            value = build(meta_copy(model))
        with _LOCK:
            table.setdefault(key, value)
    return table[key]


def pick_for_flop_ratio(values: Sequence, flops: Callable[[Any], float], ratio: float) -> Any:
    """The value of ``values`` (the neutral one first) whose ``flops(value)`` is closest to ``ratio`` times the
    neutral value's."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"A FLOP ratio is a share of the unreduced forward's FLOPs, in (0, 1], not {ratio}.")
    with uncounted():
        return closest_setting(values, functools.lru_cache(maxsize=None)(flops), ratio * flops(values[0]))


@contextlib.contextmanager
def uncounted():
    """Counting for a FLOP target inside a forward that is itself being counted or profiled (the throughput
    harness's FLOP count): the dispatch modes around it (an outer FlopCounterMode) are set aside meanwhile, so
    the meta copy's operators are never added to the forward's own count. torch offers this only privately."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def keep_rates(step: float = 0.01) -> list[float]:
    """EViT keep rates from 1 (neutral) down to ``step``, in ``step``s: the values a FLOP target chooses from."""
    count = round(1 / step)
    return [round(1 - i * step, 6) for i in range(count)]
