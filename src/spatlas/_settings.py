"""Process-wide settings (threads)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def _default_threads() -> int:
    env = os.environ.get("SPATLAS_NUM_THREADS")
    if env:
        return max(1, int(env))
    return available_cores()


@dataclass
class Settings:
    """``n_threads``: threads for torch and BLAS in training loops (env ``SPATLAS_NUM_THREADS``)."""

    n_threads: int = _default_threads()


settings = Settings()


@contextmanager
def torch_threads(n: int | None = None) -> Iterator[None]:
    """Run a block with torch (and BLAS/OpenMP) limited to ``n`` threads, then restore."""
    import torch
    from threadpoolctl import threadpool_limits

    n = n or settings.n_threads
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(old)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    from ._deps import import_optional
    from ._errors import SpatlasInputError

    torch = import_optional("torch", purpose="models and extractors")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SpatlasInputError(f"device must be cpu, cuda or auto (got {device!r})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpatlasInputError("device 'cuda' requested but no CUDA GPU is available")
    return device
