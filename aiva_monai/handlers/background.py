"""A one-worker background process that dies with the training process (the overlapped clustering round)."""

from __future__ import annotations

import os
import threading
import time

import torch

__all__ = ["background_executor"]


def background_executor():
    """A ``ProcessPoolExecutor`` with one spawned worker (a clean interpreter: no copy of a process with torch
    threads or CUDA state) that runs with one torch thread and exits when this process is gone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_background_init,
        initargs=(os.getpid(),),
    )


def _background_init(parent: int) -> None:
    """Initialiser of the worker: one torch thread (the clustering's own threads are ``settings.n_jobs``), and
    exit as soon as the parent is gone, even when it was killed with SIGKILL (no orphan left holding its
    output pipes)."""
    torch.set_num_threads(1)
    try:  # Linux: the kernel sends SIGKILL when the parent dies
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:  # elsewhere (and as a fallback): poll for the parent
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="aiva-parent-watch").start()
