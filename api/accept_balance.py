"""API workers share connections: each new connection goes to the worker holding the fewest open ones.

BentoML 1.4 hands every API worker the same listening socket and uvicorn serves it with `loop.create_server`. When a
connection arrives, Linux wakes the workers blocked in `epoll_wait` on it last-in first-out, so the worker that went
idle most recently wins, and an idle worker keeps winning: a client that opens a few keep-alive connections at once
(a Django backend's pool, Nginx's upstream keep-alive) lands all of them on one worker, and the other serves nothing
for as long as they live (issue #29: 0 % / 100 % of the API CPU). `SO_REUSEPORT` per worker would spread connections
by a hash of their addresses: even on average, but a pool of 10 lands 8/2 or worse one time in ten.

Here each API worker accepts from the shared socket itself. Every worker publishes its count of open connections on
a board in shared memory (one slot per worker, keyed by the arbiter's pid); when a connection is pending, a worker
whose count is the lowest (ties included) accepts it at once, and one with more steps back for `DEFER_S`, so that the
worker with fewer takes it, and accepts it only if it is still waiting then (the other worker is busy, or gone). The
accepted socket is served by uvicorn's own protocol (`loop.connect_accepted_socket`), TLS included. `install()`
(called by `api.bentoml_patches.install` in every process) wraps uvicorn's loop factory, which takes effect in API
workers alone, before uvicorn starts serving; runners are left as they are.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import logging
import mmap
import os
import select
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn

from api.shutdown import arbiter_pid
from state.tasks import _pid_alive

log = logging.getLogger("neuronova.accept")
DEFER_S = 0.05
"""How long a worker holding more connections than another leaves a pending connection to it."""
RECHECK_S = 0.005
"""How often a deferring worker looks again: whether the connection was taken, or the counts changed."""
SLOTS = 64
"""Workers one board holds (BentoML numbers them from 1)."""
_SLOT = 2  # int64 words a slot: the worker's pid, its open connections
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class ConnectionBoard:
    """Open-connection counts of a server's API workers, in a small file mapped by each (one writer a slot)."""

    def __init__(self, path: Path, worker_index: int) -> None:
        if not 1 <= worker_index <= SLOTS:
            raise ValueError(f"worker index {worker_index} outside 1..{SLOTS}")
        size = SLOTS * _SLOT * 8
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(descriptor).st_size < size:
                os.ftruncate(descriptor, size)
            self._map = mmap.mmap(descriptor, size)
        finally:
            os.close(descriptor)
        self._words = memoryview(self._map).cast("q")
        self._mine = (worker_index - 1) * _SLOT
        self._words[self._mine] = os.getpid()
        self._words[self._mine + 1] = 0

    def publish(self, open_connections: int) -> None:
        self._words[self._mine + 1] = open_connections

    def fewest_elsewhere(self) -> int | None:
        """The fewest open connections of another live worker, or None when no other worker is live."""
        counts = []
        for slot in range(0, SLOTS * _SLOT, _SLOT):
            pid = self._words[slot]
            if slot != self._mine and pid > 0 and _pid_alive(pid):
                counts.append(self._words[slot + 1])
        return min(counts, default=None)


def _readable(sock: socket.socket) -> bool:
    """Whether a connection is pending on the listening socket (without accepting it)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def board_path(arbiter: int) -> Path:
    """The board of the server whose arbiter has pid `arbiter` (in shared memory where Linux has it)."""
    folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return folder / f"neuronova-connections-{arbiter}"


class LeastConnectionsServer:
    """What `loop.create_server(sock=...)` gives uvicorn (it calls `close` and `wait_closed`), accepting by the
    board's rule (module doc)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol_factory: Callable[[], asyncio.BaseProtocol], ssl: Any, board: ConnectionBoard) -> None:
        self._loop = loop
        self._sock = sock
        self._protocol_factory = protocol_factory
        self._ssl = ssl
        self._board = board
        self._transports: set[asyncio.BaseTransport] = set()
        self._starting: set[asyncio.Task] = set()
        """Accepted connections whose protocol is being set up (held here: the loop keeps tasks only weakly)."""
        self._deferred: asyncio.TimerHandle | None = None
        self._serving = True
        self.sockets = [sock]
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_pending)

    def open_connections(self) -> int:
        self._transports = {t for t in self._transports if not t.is_closing()}
        return len(self._transports) + len(self._starting)

    def _on_pending(self) -> None:
        if self._my_turn():
            self._accept()
            return
        self._loop.remove_reader(self._sock.fileno())  # level-triggered: it would fire again at once
        self._deferred = self._loop.call_later(RECHECK_S, self._recheck, self._loop.time())

    def _my_turn(self) -> bool:
        """Whether no other live worker holds fewer open connections than this one (publishing this one's count)."""
        mine = self.open_connections()
        self._board.publish(mine)
        fewest = self._board.fewest_elsewhere()
        return fewest is None or mine <= fewest

    def _recheck(self, deferred_at: float) -> None:
        """While deferring: done once another worker took the connection; take it when it is this worker's turn
        now, or when it has waited `DEFER_S` (the worker with fewer is busy, or gone)."""
        self._deferred = None
        if not self._serving:
            return
        if not _readable(self._sock):
            self._loop.add_reader(self._sock.fileno(), self._on_pending)
            return
        if self._loop.time() - deferred_at < DEFER_S and not self._my_turn():
            self._deferred = self._loop.call_later(RECHECK_S, self._recheck, deferred_at)
            return
        self._accept()
        self._loop.add_reader(self._sock.fileno(), self._on_pending)

    def _accept(self) -> None:
        try:
            connection, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it, or the client gave up
        except OSError as exc:
            if exc.errno not in _EXHAUSTED:
                raise
            log.warning("accept failed (%s): retrying in %.2f s", errno.errorcode[exc.errno], DEFER_S)
            self._loop.remove_reader(self._sock.fileno())
            self._deferred = self._loop.call_later(DEFER_S, self._recheck, self._loop.time() - DEFER_S)
            return
        connection.setblocking(False)
        starting = self._loop.create_task(self._serve(connection))
        self._starting.add(starting)
        starting.add_done_callback(self._starting.discard)
        self._board.publish(self.open_connections())

    async def _serve(self, connection: socket.socket) -> None:
        try:
            transport, protocol = await self._loop.connect_accepted_socket(self._protocol_factory, connection,
                                                                           ssl=self._ssl)
        except (OSError, ConnectionError) as exc:  # e.g. a failed TLS handshake: that client's loss alone
            log.info("connection dropped before serving: %s", type(exc).__name__)
            connection.close()
            return
        self._transports.add(transport)
        lost = protocol.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            """The board learns of a closed connection at once (a stale, higher count would draw connections away
            from a worker that has just lost its own)."""
            try:
                lost(exc)
            finally:
                self._transports.discard(transport)
                self._board.publish(self.open_connections())

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        if self._deferred is not None:
            self._deferred.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._board.publish(0)

    async def wait_closed(self) -> None:
        return None

    def is_serving(self) -> bool:
        return self._serving


def balanced_loop_class(base: type[asyncio.AbstractEventLoop], board: ConnectionBoard) -> type:
    """`base` whose servers on a given listening socket (how BentoML's workers serve) accept by the board's rule."""

    class LeastConnectionsLoop(base):  # type: ignore[misc, valid-type]
        async def create_server(self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: Any = None,
                                port: Any = None, *, sock: socket.socket | None = None, ssl: Any = None,
                                **kwargs: Any) -> Any:
            if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
                return await super().create_server(protocol_factory, host, port, sock=sock, ssl=ssl, **kwargs)
            return LeastConnectionsServer(self, sock, protocol_factory, ssl, board)

    return LeastConnectionsLoop


def prepare_board() -> None:
    """In the arbiter, before it starts its workers: a fresh, empty board for them, removed when the arbiter exits."""
    path = board_path(os.getpid())
    path.unlink(missing_ok=True)
    atexit.register(path.unlink, missing_ok=True)


def install() -> None:
    """In a BentoML worker: if it turns out to be an API worker (known only once BentoML loaded the service), the
    event loop uvicorn makes (uvloop where installed) serves the shared socket by least connections."""
    original = uvicorn.Config.get_loop_factory

    def get_loop_factory(config: uvicorn.Config) -> Callable[[], asyncio.AbstractEventLoop] | None:
        from bentoml._internal.context import server_context

        factory = original(config)
        if server_context.service_type != "entry_service" or server_context.worker_index is None or factory is None:
            return factory
        board = ConnectionBoard(board_path(arbiter_pid()), server_context.worker_index)
        with contextlib.closing(factory()) as probe:
            return balanced_loop_class(type(probe), board)

    uvicorn.Config.get_loop_factory = get_loop_factory  # type: ignore[method-assign]
