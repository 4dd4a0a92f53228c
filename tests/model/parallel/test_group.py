"""loom.model.parallel.group: the shared-memory all-reduce (two threads stand in for two ranks: the
kernel releases the GIL), its failure when a rank is gone, a peer that dies while starting, and step
messages on the wire."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import torch

from loom.model.attention import AttentionMetadata, PrefillChunk
from loom.model.kernels import native_ops
from loom.model.parallel.group import SharedRegion, TensorGroup, _from_wire, _to_wire

pytestmark = pytest.mark.skipif(native_ops() is None, reason="the native kernels did not build")


def _region(slot_bytes: int = 1 << 16) -> tuple[SharedRegion, torch.Tensor]:
    region = SharedRegion.create(2, slot_bytes)
    assert region is not None
    mapped = region.map()
    os.unlink(region.path)  # as TensorGroup.start does once every rank has mapped it
    return region, mapped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_ranks_get_the_same_sum(dtype: torch.dtype) -> None:
    region, mapped = _region()
    ops = native_ops()
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    inputs = {r: [torch.randn(3, 100).to(dtype) for _ in range(5)] for r in (0, 1)}

    def rank(r: int) -> None:
        for seq, x in enumerate(inputs[r], start=1):  # both parities of the slot sets, several times
            y = x.clone()
            ops.shm_all_reduce(y, mapped, r, 2, region.slot_bytes, seq, [])
            results[r].append(y)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for i in range(5):
        assert torch.equal(results[0][i], results[1][i])  # the same bits on every rank
        expected = (inputs[0][i].float() + inputs[1][i].float()).to(dtype)
        assert torch.equal(results[0][i], expected)


def test_a_rank_that_is_gone_fails_the_wait() -> None:
    region, mapped = _region()
    ours, theirs = socket.socketpair()
    theirs.close()  # the other rank's process exited
    with pytest.raises(RuntimeError, match="tensor-parallel rank is gone"):
        native_ops().shm_all_reduce(torch.ones(4), mapped, 0, 2, region.slot_bytes, 1, [ours.fileno()])
    ours.close()


def test_a_tensor_larger_than_the_slot_is_refused() -> None:
    region, mapped = _region(64)
    with pytest.raises(RuntimeError, match="exceeds the shared slot"):
        native_ops().shm_all_reduce(torch.ones(32), mapped, 0, 2, region.slot_bytes, 1, [])


def test_no_room_for_the_region_falls_back_to_gloo(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("loom.model.parallel.group._SHM_DIR", str(tmp_path))
    monkeypatch.setattr(os, "posix_fallocate", full)
    assert SharedRegion.create(2, 1 << 20) is None
    assert list(tmp_path.iterdir()) == []  # nothing left behind


class _ExitOnArrival:
    """Unpickled in the peer, it ends the peer's process before the peer reports ready."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_peer_that_dies_while_starting_fails_the_start_at_once() -> None:
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 exited while starting \(exit code 3"):
        TensorGroup.start(2, print, (_ExitOnArrival(),))
    assert time.monotonic() - t0 < 30  # not the 2-minute join timeout


def test_step_messages_keep_their_structure_on_the_wire() -> None:
    meta = AttentionMetadata(torch.tensor([1, 2]), torch.tensor([0, 1]), 1, torch.zeros(1, 3, dtype=torch.int32),
                             torch.tensor([4], dtype=torch.int32),
                             [PrefillChunk(1, 2, 0, torch.tensor([5]), tree=torch.eye(2, dtype=torch.bool))])
    back = _from_wire(_to_wire([meta, (1, None)]), torch.device("cpu"))
    assert back[1] == (1, None)
    got = back[0]
    assert isinstance(got, AttentionMetadata) and isinstance(got.prefills[0], PrefillChunk)
    assert torch.equal(got.decode_block_tables, meta.decode_block_tables) and got.decode_block_tables.dtype == torch.int32
    assert torch.equal(got.prefills[0].tree, meta.prefills[0].tree) and got.residual is None
