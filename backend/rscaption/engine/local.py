"""The local engine's threads: one reader, N model workers, the caller's thread as the one writer.

Measured on a shared 2-core machine, one model call using both cores through torch's intra-op
threads slowed down 4-10x whenever another job held a core (every parallel op waits for its
slowest thread); N workers with one intra-op thread each run N batches side by side, never wait on
each other, and lose only the share of the machine another job takes.  The reader keeps a bounded
queue of tile batches ahead of the workers so reading and preprocessing overlap with the model;
results are written in plan order by the calling thread (SQLite connections belong to the thread
that opened them), one transaction per batch, so a cancel or a crash keeps every batch that was
written and a resume redoes only the rest.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

POLL_S = 0.1  # how often blocked threads look at the stop flag and the caller's cancel
# Beyond this many workers the Python parts of decoding (beam bookkeeping) contend for the GIL;
# more cores become intra-op threads of each worker instead.
MAX_WORKERS = 8


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity, cgroup cpusets), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(n: int):
    """Intra-op threads for the duration of a run, restored afterwards (the plugin's process and
    the worker keep torch for other calls).  New threads take the global setting when they first
    run a torch op, so the workers started inside inherit ``n``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def set_interop_threads(n: int = 1) -> None:
    """Inter-op threads only serve torch.jit forks, which the engine never uses; torch allows
    setting this once, before any inter-op work, so a later call is a no-op."""
    import torch

    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)


@dataclass
class FlowStats:
    """Seconds spent per stage, summed over the threads that ran it, and how long workers sat idle
    waiting for tiles (what reading failed to hide)."""

    read_s: float = 0.0
    step_s: float = 0.0
    write_s: float = 0.0
    worker_wait_s: float = 0.0
    batches: int = 0
    workers: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + seconds)

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "lock"}


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def run_batches(read: Callable, tiles: Iterable, batch_size: int, step: Callable, write: Callable,
                should_cancel: Callable[[], bool] | None = None, workers: int = 1,
                stats: FlowStats | None = None, queue_batches: int | None = None) -> bool:
    """Read ``tiles`` in batches, run ``step(batch)`` on ``workers`` threads, ``write(records,
    skipped)`` each result in plan order on the calling thread.  ``read(tile)`` returns an item for
    the batch or None (skipped as nodata).  Returns True when cancelled.  ``tiles`` is taken
    lazily, one batch at a time, so a 10^6-tile plan is never a list.

    A read error stops the run after the batches read before it; a step error stops it at once;
    either way batches already finished are still written, then the error is raised here.  Cancel stops handing out batches; those being computed finish and are
    written, so no finished work is lost and nothing waits longer than one batch."""
    stats = stats if stats is not None else FlowStats()
    workers = max(1, int(workers))
    stats.workers = workers
    stop = threading.Event()
    todo: queue.Queue = queue.Queue(maxsize=queue_batches or workers + 1)
    done: queue.Queue = queue.Queue()

    def put(q, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def reader():
        try:
            it = iter(tiles)
            for seq in itertools.count():
                t0 = time.perf_counter()
                batch, skipped = [], 0
                chunk = list(itertools.islice(it, batch_size))
                if not chunk:
                    break
                for tile in chunk:
                    if stop.is_set():
                        return
                    item = read(tile)
                    if item is None:
                        skipped += 1
                    else:
                        batch.append(item)
                stats.add("read_s", time.perf_counter() - t0)
                if not put(todo, (seq, batch, skipped)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, behind the
            put(todo, _Failure(exc))  # batches read before it, so the workers still caption those
        for _ in range(workers):
            put(todo, _END)

    def worker():
        try:
            while True:
                t0 = time.perf_counter()
                item = None
                while not stop.is_set():
                    try:
                        item = todo.get(timeout=POLL_S)
                        break
                    except queue.Empty:
                        continue
                if item is None or item is _END:
                    return
                if isinstance(item, _Failure):
                    done.put(item)
                    return
                stats.add("worker_wait_s", time.perf_counter() - t0)
                seq, batch, skipped = item
                t0 = time.perf_counter()
                records = step(batch)
                stats.add("step_s", time.perf_counter() - t0)
                done.put((seq, records, skipped))
        except BaseException as exc:  # noqa: BLE001
            done.put(_Failure(exc))
            stop.set()

    threads = [threading.Thread(target=reader, name="rscaption-reader", daemon=True)]
    threads += [threading.Thread(target=worker, name=f"rscaption-worker-{i}", daemon=True) for i in range(workers)]
    if should_cancel and should_cancel():  # cancelled before the first read: nothing read, nothing written
        return True
    for t in threads:
        t.start()
    pending: dict[int, tuple] = {}
    next_seq = 0
    failure: _Failure | None = None
    cancelled = False

    def flush(everything: bool = False):
        nonlocal next_seq
        while next_seq in pending or (everything and pending):
            seq = next_seq if next_seq in pending else min(pending)
            records, skipped = pending.pop(seq)
            t0 = time.perf_counter()
            write(records, skipped)
            stats.add("write_s", time.perf_counter() - t0)
            stats.batches += 1
            next_seq = seq + 1

    try:
        while any(t.is_alive() for t in threads[1:]) or not done.empty():
            if not cancelled and should_cancel and should_cancel():
                cancelled = True
                stop.set()
            try:
                got = done.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if isinstance(got, _Failure):
                failure = failure or got
                stop.set()
                continue
            seq, records, skipped = got
            pending[seq] = (records, skipped)
            if failure is None:
                flush()
        flush(everything=True)  # after a stop: what finished behind a gap is written too
    finally:
        stop.set()
        for t in threads:
            t.join()
    if failure is not None:
        raise failure.exc
    return cancelled


def plan_workers(device, requested: int | None = None) -> tuple[int, int | None]:
    """(model workers, intra-op threads per worker; None leaves torch's setting alone).  On the CPU
    one single-threaded worker per usable core (up to MAX_WORKERS, then the cores are shared out as
    threads); on a GPU one worker feeds the device."""
    if getattr(device, "type", str(device)) != "cpu":
        return 1, None
    cores = usable_cores()
    n = max(1, int(requested)) if requested else min(cores, MAX_WORKERS)
    return n, max(1, cores // n)


def run_local(device, workers: int | None, read: Callable, tiles: Iterable, batch_size: int, step: Callable,
              write: Callable, should_cancel: Callable[[], bool] | None = None,
              stats: FlowStats | None = None) -> bool:
    """:func:`run_batches` with the thread plan of :func:`plan_workers`."""
    n, threads = plan_workers(device, workers)
    set_interop_threads(1)
    with torch_threads(threads) if threads else contextlib.nullcontext():
        return run_batches(read, tiles, batch_size, step, write, should_cancel, n, stats)
