"""Client for the ``rscaption.worker`` subprocess (the "local subprocess" backend mode).

Used from QgsTask threads and Processing algorithms, never from the GUI thread: calls block.
Plain ``subprocess`` rather than QProcess because a task thread has no Qt event loop; stdout and
stderr are drained by daemon threads so the worker can never stall on a full pipe, and the
caller polls a queue so cancel and a dead process are noticed within a fraction of a second.
"""

from __future__ import annotations

import collections
import os
import queue
import subprocess
import sys
import threading
import time

from .paths import ensure_backend_on_path, subprocess_env

ensure_backend_on_path()
from rscaption.protocol import ProtocolError, TERMINAL_TYPES, encode_request, parse_message  # noqa: E402  (pure, no torch)

_EOF = object()


class BackendError(RuntimeError):
    """The backend failed or vanished; the message is meant for the user. ``kind`` and ``details``
    carry the worker's error message (e.g. kind ``large_run`` with ``tiles`` and ``seconds``)."""

    def __init__(self, message: str, kind: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.kind = kind
        self.details = dict(details or {})


class BackendClient:
    def __init__(self, python: str, device: str | None = None, startup_timeout: float = 300.0,
                 silence_timeout: float = 120.0, on_log=None):
        if not python:
            raise BackendError("no backend Python is configured: set one in rscaption Settings "
                               "or run \"Set up backend\"")
        if not os.path.exists(python):
            raise BackendError(f"backend Python not found: {python} (check rscaption Settings)")
        self.python = python
        self.device = None if device in (None, "", "auto") else device
        self.startup_timeout = startup_timeout
        self.silence_timeout = silence_timeout
        self.on_log = on_log
        self.proc: subprocess.Popen | None = None
        self.hello: dict | None = None
        self.stderr_tail: collections.deque = collections.deque(maxlen=60)
        self._messages: queue.Queue = queue.Queue()
        self._write_lock = threading.Lock()
        self.lock = threading.Lock()  # held by whoever runs a request on this client
        self._pumps: list[threading.Thread] = []

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> dict:
        argv = [self.python, "-u", "-m", "rscaption.worker"]
        if self.device:
            argv += ["--device", self.device]
        kwargs = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=subprocess_env(), text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
            )
        except OSError as exc:
            raise BackendError(f"cannot start the backend with {self.python}: {exc}") from None
        self._pumps = [threading.Thread(target=self._pump_stdout, daemon=True, name="rscaption-client-out"),
                       threading.Thread(target=self._pump_stderr, daemon=True, name="rscaption-client-err")]
        for pump in self._pumps:
            pump.start()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            msg = self._next(deadline - time.monotonic())
            if msg is None:
                self.kill()
                raise BackendError(f"the backend did not start within {self.startup_timeout:.0f} s"
                                   + self._tail_text())
            if msg["type"] == "hello":
                self.hello = msg
                if msg.get("torch_error"):
                    self.close()
                    raise BackendError(f"the backend Python {self.python} cannot import torch: "
                                       f"{msg['torch_error']} (run \"Set up backend\")")
                return msg

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self, timeout: float = 5.0) -> None:
        if not self.alive():
            self.release_pipes()
            return
        try:
            self._send("shutdown")
            self.proc.stdin.close()
        except (OSError, ValueError, BackendError):
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.release_pipes()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.release_pipes()

    def release_pipes(self) -> None:
        """Close our ends of the pipes once the process has ended. Left to the garbage collector
        they raise ``ResourceWarning: unclosed file`` (three per run, more after a kill); the pump
        threads are joined first so none of them reads from a closed file."""
        if self.proc is None or self.proc.poll() is None:
            return
        for pump in self._pumps:
            if pump is not threading.current_thread():
                pump.join(2.0)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except (OSError, ValueError):
                pass

    # -- I/O -----------------------------------------------------------------------------------
    def _pump_stdout(self) -> None:
        for line in self.proc.stdout:
            if not line.strip():
                continue
            try:
                self._messages.put(parse_message(line))
            except ProtocolError as exc:
                # Not protocol: a library printed to stdout before the worker took it over.
                self.stderr_tail.append(f"(stdout) {line.rstrip()} [{exc}]")
        self._messages.put(_EOF)

    def _pump_stderr(self) -> None:
        for line in self.proc.stderr:
            line = line.rstrip()
            self.stderr_tail.append(line)
            if self.on_log:
                try:
                    self.on_log(line)
                except Exception:
                    pass

    def _next(self, timeout: float):
        try:
            msg = self._messages.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if msg is _EOF:
            self._messages.put(_EOF)  # stay at EOF for any later reader
            raise BackendError(self._died_text())
        return msg

    def _send(self, cmd: str, **fields) -> None:
        line = encode_request(cmd, **fields)
        with self._write_lock:
            try:
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
            except (OSError, ValueError):
                raise BackendError(self._died_text()) from None

    def _died_text(self) -> str:
        code = None
        if self.proc is not None:
            try:
                code = self.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
        how = f"exit code {code}" if code is not None and code >= 0 else (
            f"killed by signal {-code}" if code is not None else "closed its output")
        return f"the backend process stopped unexpectedly ({how}); finished tiles are kept" + self._tail_text()

    def _tail_text(self) -> str:
        lines = [ln for ln in self.stderr_tail if ln.strip()][-6:]
        return ("\nlast backend log lines:\n" + "\n".join(lines)) if lines else ""

    # -- requests ------------------------------------------------------------------------------
    def request(self, cmd: str, fields: dict, on_message=None, should_cancel=None, poll_s: float = 0.2) -> dict:
        """Send one request and wait for its ``done`` (returned) or ``error`` (raised).

        ``on_message`` sees every progress/tiles/result/log/heartbeat message; ``should_cancel`` is
        polled and turned into one ``cancel`` request, after which the worker finishes its batch
        and answers ``done`` with ``cancelled`` set."""
        if not self.alive():
            raise BackendError(self._died_text())
        self._send(cmd, **{k: v for k, v in fields.items() if v is not None})
        cancel_sent = False
        last_seen = time.monotonic()
        while True:
            if should_cancel is not None and not cancel_sent and should_cancel():
                self._send("cancel")
                cancel_sent = True
            msg = self._next(poll_s)
            now = time.monotonic()
            if msg is None:
                if now - last_seen > self.silence_timeout:
                    self.kill()
                    raise BackendError(f"the backend sent nothing for {self.silence_timeout:.0f} s "
                                       "(not even a heartbeat) and was stopped" + self._tail_text())
                continue
            last_seen = now
            if on_message is not None and msg["type"] not in TERMINAL_TYPES:
                on_message(msg)
            if msg["type"] == "done":
                return msg["summary"]
            if msg["type"] == "error":
                if msg.get("kind") == "protocol" and msg.get("cmd") is None:
                    raise BackendError(f"backend rejected the request: {msg['message']}")
                raise BackendError(msg["message"], kind=msg.get("kind"), details=msg)


class ClientPool:
    """Keeps idle workers alive between requests (a loaded model makes the next search instant)
    and starts another one when the idle one is busy, e.g. a search during a caption run."""

    def __init__(self, max_idle: int = 1):
        self._clients: list[BackendClient] = []
        self._lock = threading.Lock()
        self.max_idle = max_idle

    def acquire(self, python: str, device: str | None, on_log=None) -> BackendClient:
        with self._lock:
            dead = [c for c in self._clients if not c.alive()]
            self._clients = [c for c in self._clients if c.alive()]
        for client in dead:  # died (killed, crashed) since its last request: close our pipe ends
            client.release_pipes()
        with self._lock:
            for client in self._clients:
                if client.python == python and client.device == (None if device in (None, "", "auto") else device):
                    if client.lock.acquire(blocking=False):
                        client.on_log = on_log
                        return client
        client = BackendClient(python, device, on_log=on_log)
        client.lock.acquire()
        try:
            client.start()
        except Exception:
            client.kill()  # a worker that died or hung at start-up: reap it and close the pipes
            client.lock.release()
            raise
        with self._lock:
            self._clients.append(client)
        return client

    def release(self, client: BackendClient) -> None:
        client.on_log = None
        client.lock.release()
        if not client.alive():  # killed or crashed during the request
            client.release_pipes()
        with self._lock:
            if client in self._clients and not client.alive():
                self._clients.remove(client)
            idle = [c for c in self._clients if c.alive() and not c.lock.locked()]
            for extra in idle[self.max_idle:]:
                self._clients.remove(extra)
                extra.close()

    def clients(self) -> list[BackendClient]:
        with self._lock:
            return list(self._clients)

    def shutdown(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close(timeout=2.0)


POOL = ClientPool()
