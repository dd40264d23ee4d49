"""A module-scoped fixture that runs a test module on one thread.

Tiny models do many small ops; on a shared, busy 2-core CPU two threads per process spin-wait for each
other and run a tiny UNet call ~100x slower (18 s instead of 0.15 s measured), so such modules use one.
Use it with ``pytestmark = pytest.mark.usefixtures("single_thread")`` after importing it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
