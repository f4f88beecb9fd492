"""torch.compile (inductor) as an engine: the eager runner's forward on a private deep copy of its model, compiled.

``compiled_runner`` is the ``compile`` record's wrap in ``analysis.timing.engines``: the table proves the compiled
forward equal to eager on the same input before it is timed. Shapes are static (``dynamic=False``): a batch size
is compiled at its first call (the harness's warm-up), so no compile is ever timed. Inductor's C++ kernels record
themselves for ``torch.profiler`` (``cpp.enable_kernel_profile``: one check per kernel call when no profiler
listens), so the code that is timed is the code that is profiled; Triton kernels always show.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Callable

from torch import nn

from analysis.timing.harness import Runner


def private_forward(forward: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The same forward over a deep copy of its model (the model itself, or the model bound first to a method's
    forward), so that compiling never touches a shared, cached model."""
    if isinstance(forward, nn.Module):
        return copy.deepcopy(forward)
    if isinstance(forward, functools.partial) and forward.args and isinstance(forward.args[0], nn.Module):
        return functools.partial(forward.func, copy.deepcopy(forward.args[0]), *forward.args[1:], **forward.keywords)
    raise TypeError("this forward has no model to copy")


# A token-reduction forward that graph-breaks runs each block's function at another token count (ToMe r=13: twelve
# shapes per function); past dynamo's default limit of 8 recompiles a function silently falls back to eager, and
# eager blocks would be timed as compiled ones.
RECOMPILE_LIMIT = 64


def compiled(forward: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``torch.compile`` with inductor of a private copy of ``forward``, its C++ kernels visible to the profiler,
    called with a recompile limit that no forward of the registry reaches (``RECOMPILE_LIMIT``)."""
    import torch._dynamo

    function = torch.compile(private_forward(forward), backend="inductor", dynamic=False,
                             options={"cpp.enable_kernel_profile": True})

    def run(inputs: Any) -> Any:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return function(inputs)

    run.compiled = function  # the torch.compile'd callable (its ``_orig_mod``: the private copy of a module)
    return run


def compiled_runner(eager: Runner, batch: int, device: str = "cpu") -> Runner:
    """The eager runner with its forward compiled (same inputs, weights and FLOPs); compiled at the first call."""
    return dataclasses.replace(eager, forward=compiled(eager.forward))
