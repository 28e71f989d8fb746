"""Hardware efficiency: floating-point operations of one UNet forward."""

from __future__ import annotations

from typing import Any


def unet_forward_flops(unet: Any, batch_size: int = 1) -> int:
    """Floating-point operations of one forward of a ``UNet2DModel`` on ``batch_size`` slices.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts 2; convolutions,
    matrix products and attention are counted, element-wise work is not), on zeros of the UNet's input shape
    at time step 500.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    config = unet.config
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    parameter = next(unet.parameters())
    x = torch.zeros((batch_size, config.in_channels, *size), dtype=parameter.dtype, device=parameter.device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(x, 500)
    return int(counter.get_total_flops())
