"""FLOPs of one forward, counted with torch's FlopCounterMode (plus formulas for ops it does not know)."""
from __future__ import annotations

from typing import Any, Callable

import torch


def measure_flops(run: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``run()`` under torch.utils.flop_counter; (its output, FLOPs counted, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter:
        output = run()
    return output, float(counter.get_total_flops())


def extra_flop_formulas() -> dict:
    """The CPU flash-attention kernel has no formula in torch's counter; without one, fused attention on
    CPU would count as free. It computes what the other SDPA kernels compute, so reuse their formula."""
    from torch.utils.flop_counter import sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: cpu_flash_flop}
