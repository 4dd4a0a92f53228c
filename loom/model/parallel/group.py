"""The processes of a tensor-parallel model: rank 0 (the engine's own process, which schedules and
samples) and peer ranks, each in its own process with its own threads, weights and KV cache.

Ranks on one machine sum their partial outputs through a shared-memory region (a native kernel,
``kernels/all_reduce.cpp``); a gloo process group (``torch.distributed``) forms the group, agrees on
the cache size and sums what the region cannot hold or reach (another device). It is built on its own
store, so that several models in one process each have their own. Steps reach the peers as pickled
messages through a pipe from rank 0: a peer waits for the next step on the pipe, with no collective
timeout however long the engine idles, and learns that rank 0 is gone when the pipe closes."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from loom.model.kernels import native_ops

log = logging.getLogger(__name__)

# A collective waits this long for the other ranks: a step's layer on a slow rank, or a rank that
# loads its weights. Longer means a rank that hangs is noticed later; a rank that exits is noticed at once.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
JOIN_TIMEOUT = datetime.timedelta(minutes=2)  # for a spawned rank to import torch and join
PEER_ERROR_WAIT = 1.0  # seconds rank 0 waits, after a collective failed, for a peer's account of why
_HOST = "127.0.0.1"
_STOP = b""
_READY = b"ready"
_SHM_DIR = "/dev/shm"


@dataclasses.dataclass(frozen=True)
class SharedRegion:
    """Where ranks on one machine sum their tensors: a file in shared memory that every rank maps
    (unlinked once they all have), with a slot of ``slot_bytes`` per rank (``kernels/all_reduce.cpp``)."""

    path: str
    slot_bytes: int

    @staticmethod
    def create(size: int, slot_bytes: int) -> SharedRegion | None:
        """None when the native kernels or a shared-memory directory are missing, or the directory
        has no room for the region (the ranks then sum over gloo alone)."""
        ops = native_ops()
        if ops is None or not os.path.isdir(_SHM_DIR) or os.environ.get("LOOM_TP_ALL_REDUCE") == "gloo":
            return None
        fd, path = tempfile.mkstemp(prefix="loom-tp-", dir=_SHM_DIR)
        nbytes = ops.shm_header_bytes(size) + 2 * size * slot_bytes
        try:
            # Reserved now: a sparse file on a full tmpfs would kill the ranks with SIGBUS on first touch.
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            os.unlink(path)
            log.warning("no room for a %.1f MB all-reduce region in %s (%s); tensor-parallel ranks sum over gloo, "
                        "which is far slower", nbytes / 1e6, _SHM_DIR, e)
            return None
        finally:
            os.close(fd)
        return SharedRegion(path, slot_bytes)

    def map(self) -> torch.Tensor:
        return torch.from_file(self.path, shared=True, size=os.path.getsize(self.path), dtype=torch.uint8)


class TensorGroup:
    """One rank's view of the group: the all-reduce, and (rank 0) the pipes to the peers."""

    def __init__(self, rank: int, size: int, store: dist.Store, conns: list[Connection],
                 processes: list[subprocess.Popen], region: SharedRegion | None) -> None:
        """``conns``: rank 0's pipes to each peer, or a peer's pipe from rank 0. ``region``: the
        shared all-reduce region, mapped before the group forms (rank 0 unlinks it after)."""
        options = dist.ProcessGroupGloo._Options()
        options._timeout = JOIN_TIMEOUT
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=_HOST)]
        self.rank = rank
        self.size = size
        self._store = store  # the group's rendezvous: kept for as long as the group lives
        self._region = region
        self._shared = region.map() if region is not None else None
        self._pg = dist.ProcessGroupGloo(store, rank, size, options)
        self._pg.set_timeout(COLLECTIVE_TIMEOUT)
        self._conns = conns
        self._watch = [c.fileno() for c in conns]  # readable when the far end exits or reports an error
        self._seq = 0
        self._all_reduce_seconds = 0.0  # in all-reduce calls, waiting for slower ranks included
        self.peer_pids = tuple(p.pid for p in processes)
        self._finalizer = weakref.finalize(self, _stop, conns, processes) if processes else None

    @staticmethod
    def start(size: int, target: Callable[..., None], args: tuple[Any, ...], shared_slot_bytes: int = 0) -> TensorGroup:
        """Rank 0: start ranks ``1 .. size - 1``, each running ``target(group, *args)`` in a new Python
        process (``python -m loom.model.parallel``: unlike multiprocessing's spawn, it does not
        run the caller's script again, so a script needs no ``if __name__ == "__main__"`` guard), and
        join the group with them. ``shared_slot_bytes`` > 0: the ranks share this machine's memory and
        sum tensors up to that size through it, larger ones over gloo."""
        region = SharedRegion.create(size, shared_slot_bytes) if shared_slot_bytes else None
        store = dist.TCPStore(_HOST, 0, size, True, timeout=JOIN_TIMEOUT, wait_for_workers=False)
        peers, processes = [], []
        # The peers import what this process imports from where it does (a script may have extended sys.path).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            for rank in range(1, size):
                ours, theirs = socket.socketpair()
                p = subprocess.Popen([sys.executable, "-m", "loom.model.parallel", str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), env=env)
                theirs.close()
                conn = Connection(ours.detach())
                conn.send((rank, size, store.port, region, target, args))
                peers.append(conn)
                processes.append(p)
            for rank, (conn, p) in enumerate(zip(peers, processes), start=1):
                _await_ready(rank, conn, p)
            return TensorGroup(0, size, store, peers, processes, region)
        except Exception:
            _stop(peers, processes)
            raise
        finally:
            if region is not None:
                os.unlink(region.path)  # mapped by every rank by now, or no longer needed

    def close(self) -> None:
        """Rank 0: stop the peers (at most once; also when the group is garbage collected)."""
        if self._finalizer is not None:
            self._finalizer()

    def check_peers(self, error: BaseException) -> None:
        """Rank 0, after a collective failed: raise the error a peer reported, if one did, else ``error``."""
        for conn in self._conns:
            if conn.poll(PEER_ERROR_WAIT):
                try:
                    message = conn.recv_bytes()
                except (EOFError, OSError):
                    continue
                raise ValueError(f"tensor-parallel rank failed: {message.decode(errors='replace')}") from error
        raise error

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns it. Through the shared region when it holds
        ``x`` (every rank then sums in rank order, in fp32: the same bits on every rank), else gloo."""
        t0 = time.perf_counter()
        if (self._shared is not None and x.is_cpu and x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous()
                and x.numel() * x.element_size() <= self._region.slot_bytes):
            self._seq += 1
            native_ops().shm_all_reduce(x, self._shared, self.rank, self.size, self._region.slot_bytes, self._seq,
                                        self._watch)
        else:
            self._pg.allreduce([x]).wait()
        self._all_reduce_seconds += time.perf_counter() - t0
        return x

    @property
    def shares_memory(self) -> bool:
        """Whether the ranks sum through the shared region (one machine, the CPU)."""
        return self._shared is not None

    def shared_memory_args(self) -> tuple[torch.Tensor, int, int, int, list[int]]:
        """What ``DecoderStack.set_tensor_parallel`` takes: the region, rank, size, slot bytes and the pipes to watch."""
        assert self._shared is not None and self._region is not None
        return self._shared, self.rank, self.size, self._region.slot_bytes, self._watch

    def reserve(self, n: int) -> int:
        """The first of ``n`` sequence numbers for all-reduces made natively (the fused decode stack)."""
        first = self._seq + 1
        self._seq += n
        return first

    def add_all_reduce_seconds(self, seconds: float) -> None:
        self._all_reduce_seconds += seconds

    def take_all_reduce_seconds(self) -> float:
        """Seconds spent in :meth:`all_reduce` since the last call."""
        seconds, self._all_reduce_seconds = self._all_reduce_seconds, 0.0
        return seconds

    def barrier(self) -> None:
        self._pg.barrier().wait()

    def min_int(self, value: int) -> int:
        """The smallest of every rank's ``value``."""
        t = torch.tensor([value], dtype=torch.int64)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self._pg.allreduce([t], options).wait()
        return int(t.item())

    def send(self, message: Any) -> None:
        """Rank 0: send a step's message to every peer (tensors travel as NumPy arrays)."""
        data = pickle.dumps(_to_wire(message), protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self._conns:
            conn.send_bytes(data)

    def receive(self, device: torch.device) -> Any:
        """A peer: the next message from rank 0, or None when rank 0 stopped the group or is gone."""
        try:
            data = self._conns[0].recv_bytes()
        except (EOFError, OSError):
            return None
        return None if data == _STOP else _from_wire(pickle.loads(data), device)


def _await_ready(rank: int, conn: Connection, process: subprocess.Popen) -> None:
    """Until the peer has unpacked its task (its imports done), or fail at once if it exits first."""
    deadline = time.monotonic() + JOIN_TIMEOUT.total_seconds()
    while not conn.poll(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            break
    else:
        try:
            if conn.recv_bytes() == _READY:
                return
        except (EOFError, OSError):  # it closed the pipe: it is exiting
            pass
    try:
        code = process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"tensor-parallel rank {rank} did not start within "
                           f"{JOIN_TIMEOUT.total_seconds():.0f} s") from None
    raise RuntimeError(f"tensor-parallel rank {rank} exited while starting (exit code {code}; its error is above, "
                       "on this process's stderr)")


def peer_main(fd: int) -> None:
    """A peer process: join the group, then run the target rank 0 sent. A failure goes back to rank 0 as text."""
    conn = Connection(fd)
    rank, size, port, region, target, args = conn.recv()
    conn.send_bytes(_READY)
    try:
        store = dist.TCPStore(_HOST, port, size, False, timeout=JOIN_TIMEOUT)
        target(TensorGroup(rank, size, store, [conn], [], region), *args)
    except Exception as e:  # reported to rank 0, which raises it
        log.exception("tensor-parallel rank %d failed", rank)
        try:
            conn.send_bytes(f"rank {rank}: {type(e).__name__}: {e}".encode())
        except OSError:
            pass


def _stop(peers: list[Connection], processes: list[subprocess.Popen]) -> None:
    for conn in peers:
        try:
            conn.send_bytes(_STOP)
        except OSError:
            pass
        conn.close()
    for p in processes:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@dataclasses.dataclass(frozen=True)
class _WireTensor:
    array: np.ndarray


def _to_wire(obj: Any) -> Any:
    """``obj`` with every tensor replaced by a NumPy copy on the CPU (which pickles without
    torch's per-tensor archive, and lands on the peer's own device)."""
    return _map_leaves(obj, torch.Tensor, lambda t: _WireTensor(t.detach().cpu().numpy()))


def _from_wire(obj: Any, device: torch.device) -> Any:
    return _map_leaves(obj, _WireTensor, lambda w: torch.from_numpy(w.array).to(device))


def _map_leaves(obj: Any, leaf: type, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with ``fn(x)`` for each ``x`` of type ``leaf`` in it, through lists, tuples and dataclasses."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_leaves(x, leaf, fn) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: _map_leaves(getattr(obj, f.name), leaf, fn) for f in dataclasses.fields(obj)})
    return obj
