"""Running a function on gloo ranks in child processes, for the distributed tests."""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exiting(rank, fn, *args):
    # gloo's worker threads can outlive destroy_process_group and, releasing a Work that holds
    # tensors during interpreter shutdown, abort the process (ProcessGroupGloo::runLoop ->
    # decref_pyobject -> std::terminate), with nn.Linear as with bpext. The worker therefore
    # leaves with os._exit once fn has returned (its results written), skipping the teardown.
    code = 1
    try:
        fn(rank, *args)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def spawn(fn, nprocs: int, *args) -> None:
    """fn(rank, *args) in nprocs child processes; raises if any of them fails."""
    mp.spawn(_exiting, args=(fn, *args), nprocs=nprocs, join=True)
