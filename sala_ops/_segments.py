"""Which packed sequence (segment) each index falls in, on the device."""
from __future__ import annotations

import torch


def segment_of(offsets: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Segment n with offsets[n] <= id < offsets[n + 1] of every id (int64), for offsets starting at 0 and ids >= 0:
    the number of offsets <= id, minus one. Ids at or past the end get N, one past the last segment (callers clamp
    or mask).

    The search runs in the whole offsets tensor, never in offsets[1:]: torch.compile's inductor in torch 2.11
    (the GPU image's) drops a sliced boundary tensor's storage offset in searchsorted's CUDA code
    (pytorch/pytorch#182343), which silently shifted every sequence id by one: wrong sparse_attention gradients
    and an out-of-bounds index assert under torch.compile on an H200."""
    return torch.searchsorted(offsets, ids, right=True) - 1
