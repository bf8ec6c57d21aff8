"""torch's CPU thread count for one stretch of work, given back after."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch CPU threads, then restore the caller's setting.

    Training is pinned this way where results must not depend on the caller: a matmul's float sums depend
    on how torch splits them over threads, and training grows those last-bit differences into other models.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
