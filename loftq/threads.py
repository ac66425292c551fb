"""Running latency-bound CPU work on one thread.

Thin QRs and the chunked fake quantization are thousands of short ops. Split over OpenMP
threads they gain nothing alone, and when another process holds a core every op waits at a
barrier for a descheduled thread: on 2 cores beside a busy process a 4096×48 QR took 316 ms on
two threads and 1.7 ms on one; an 11008×4096 fake quantization 2–6 s on two and 0.33 s on one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """torch's intra-op threads set to 1 inside the block when ``device`` is the CPU."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
