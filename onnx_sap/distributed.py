"""Where evaluate's and sweep's tasks run: in this process, or on a Dask cluster.

The callers cut their work into tasks whose results depend only on the tasks' arguments (every seed
derives from the user's seed and the task's index, never from the worker, its earlier tasks or the
order in which tasks finish), so every executor, whatever its number of workers, returns the same
results. Dask (`pip install 'onnx-sap[dask]'`) is imported only when a scheduler is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from typing import Any, Callable, Iterator, Sequence

from .errors import OnnxSapError, OptionError, first_line

CONNECT_TIMEOUT_S = 5  # an unreachable scheduler must fail well within 10 s
_LOCAL = re.compile(r"local(?::(\d+))?")
_ADDRESS = re.compile(r"(tcp|tls|ucx|inproc|ws|wss)://\S+")


class InProcess:
    """Runs the tasks one after the other in this process (the default)."""

    remote = False

    def __init__(self, threads: int | None = None):
        self.threads = threads  # ONNX Runtime threads per session (None: its default, all cores)

    def share(self, obj: Any) -> Any:
        """A handle on obj for the tasks' arguments (here: obj itself)."""
        return obj

    def map(self, fn: Callable, calls: Sequence[tuple], labels: Sequence[str],
            on_done: Callable[[int, Any], None]) -> list:
        """fn(*args) for each args of calls, in order; on_done(i, result) after each."""
        results = []
        for i, args in enumerate(calls):
            results.append(fn(*args))
            on_done(i, results[-1])
        return results


class DaskExecutor:
    """Runs the tasks on a Dask cluster, as they become free; a task that fails (or whose worker
    dies) is run once more, and a second failure is reported naming the task."""

    remote = True

    def __init__(self, client: Any, threads: int | None):
        self.client = client
        self.threads = threads  # ONNX Runtime threads per task (LocalCluster: the cores split between workers)

    def share(self, obj: Any) -> Any:
        """obj sent once to every worker; tasks receive it in place of the returned future."""
        return self.client.scatter(obj, broadcast=True, hash=False)

    def map(self, fn: Callable, calls: Sequence[tuple], labels: Sequence[str],
            on_done: Callable[[int, Any], None]) -> list:
        """fn(*args) for each args of calls as Dask tasks; on_done(i, result) as each finishes."""
        from distributed import as_completed

        run = uuid.uuid4().hex[:8]
        futures = [self.client.submit(fn, *args, key=f"onnx-sap-{run}-{i}", retries=1, pure=False)
                   for i, args in enumerate(calls)]
        index = {f.key: i for i, f in enumerate(futures)}
        results: list = [None] * len(calls)
        try:
            for future in as_completed(futures):
                i = index[future.key]
                try:
                    results[i] = future.result()
                except Exception as e:  # the task's own error, or KilledWorker after a second dead worker
                    raise OnnxSapError(f"{labels[i]} failed twice (Dask retried it once): "
                                       f"{type(e).__name__}: {first_line(e)}") from None
                on_done(i, results[i])
        finally:
            self.client.cancel([f for f in futures if not f.done()])
        return results


def parse_scheduler(scheduler: Any) -> tuple[str, Any]:
    """('local', workers) for local or local:N, ('address', ADDRESS) for a scheduler address,
    ('client', CLIENT) for a distributed.Client."""
    if not isinstance(scheduler, str):
        if type(scheduler).__name__ == "Client" and hasattr(scheduler, "submit"):
            return "client", scheduler
        raise OptionError("scheduler", f"must be a string or a distributed.Client, got {type(scheduler).__name__}")
    m = _LOCAL.fullmatch(scheduler)
    if m:
        workers = int(m.group(1)) if m.group(1) else max(1, os.cpu_count() or 1)
        if workers < 1:
            raise OptionError("scheduler", f"local:N needs N >= 1 workers, got {scheduler!r}")
        return "local", workers
    if _ADDRESS.fullmatch(scheduler):
        return "address", scheduler
    raise OptionError("scheduler", f"must be local, local:N or a scheduler address such as tcp://HOST:8786, "
                                   f"got {scheduler!r}")


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise OnnxSapError("a Dask scheduler needs dask.distributed, which is not installed: "
                           "pip install 'onnx-sap[dask]' (or run without a scheduler)") from None
    return distributed


@contextlib.contextmanager
def open_executor(scheduler: Any) -> Iterator[InProcess | DaskExecutor]:
    """InProcess for None; a distributed.Client of the caller's as it is; otherwise a Dask client on
    a LocalCluster (local[:N], bound to 127.0.0.1, one thread per worker) or on the scheduler at the
    given address, closed on exit."""
    if scheduler is None:
        yield InProcess()
        return
    if not isinstance(scheduler, str):  # the caller's own Client (a notebook's, a test's)
        yield DaskExecutor(scheduler, None)
        return
    kind, where = parse_scheduler(scheduler)
    distributed = _import_distributed()
    import dask

    cluster = None
    if kind == "local":
        # A task whose worker dies is rerun once, like a task that raises (retries=1): then it fails.
        with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
            cluster = distributed.LocalCluster(n_workers=where, threads_per_worker=1, processes=True,
                                               host="127.0.0.1", dashboard_address=None,
                                               # its HTTP routes on a free port: 8787 may be taken
                                               scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                                               silence_logs=logging.ERROR)
        client = distributed.Client(cluster)
        threads: int | None = max(1, (os.cpu_count() or 1) // where)
    else:
        try:
            client = distributed.Client(where, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError) as e:
            raise OnnxSapError(f"cannot reach the Dask scheduler at {where} within {CONNECT_TIMEOUT_S} s "
                               f"({first_line(e, 120)}); check the address and that the scheduler runs") from None
        threads = None
    try:
        yield DaskExecutor(client, threads)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
