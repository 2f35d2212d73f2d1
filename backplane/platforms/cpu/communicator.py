"""Collectives between the ranks of one host through shared memory.

A tensor-parallel decoder all-reduces twice per layer: 48 times a step for a
24-layer model. Over gloo (loopback TCP) each of those costs ~0.1-1 ms on a
small CPU, which is most of a batch-1 step; through shared memory a rank
copies its tensor into its slot, raises its sequence flag and sums every
rank's slot once all flags are up, a few microseconds plus the copy.

Layout of the segment: one int64 flag per rank, then two banks (by sequence
parity) of one slot per rank. Writing the bank of call ``s`` is safe once
every rank's flag reached ``s - 1``: a rank raises its flag for ``s - 1``
only after it finished reading call ``s - 2``, the last user of that bank.
Every rank sums the slots in rank order in float32, so every rank gets the
same bits. Tensors larger than a slot, and ``send``/``recv``, go through
gloo (the base class). x86 only: the flag protocol relies on its
store ordering (a rank's data is visible before its flag).
"""

from __future__ import annotations

import atexit
import logging
import os
import platform as pyplatform
import socket
import uuid
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch
import torch.distributed as dist

from backplane.plugins_sdk import Communicator

logger = logging.getLogger(__name__)

# Bytes of one rank's slot: a batch-64 hidden state of a 4096-wide bf16 model fits.
SLOT_BYTES = int(os.environ.get("BACKPLANE_CPU_SHM_SLOT_BYTES", str(4 << 20)))
_FLAG_BYTES = 64  # one cache line per flag, so ranks do not share lines while spinning


# Spins between two checks that the ranks being waited for still exist (~ms apart).
_LIVENESS_EVERY = 2000


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def shm_supported() -> bool:
    """x86 Linux: the flag protocol needs x86's store order, cleanup needs /dev/shm."""
    return (pyplatform.machine().lower() in ("x86_64", "amd64")
            and os.path.isdir("/dev/shm"))


class SharedMemoryCommunicator(Communicator):
    """all_reduce / all_gather / broadcast through one shared segment of this host."""

    def __init__(self, group: dist.ProcessGroup | None, name: str, create: bool) -> None:
        super().__init__(group)
        size = self.world_size * _FLAG_BYTES + 2 * self.world_size * SLOT_BYTES
        self.shm = shared_memory.SharedMemory(name=name, create=create, size=size)
        # Python's resource tracker (shared by a parent and the ranks it spawned) would
        # unlink the segment when any one rank exits; the ranks remove it themselves:
        # at close, whichever rank gets there first (the others keep their mapping),
        # and at exit when the program ends without shutting the engine down.
        resource_tracker.unregister(self.shm._name, "shared_memory")  # noqa: SLF001
        atexit.register(self.close)
        buf = self.shm.buf
        self.flags = np.ndarray((self.world_size,), dtype=np.int64, buffer=buf,
                                strides=(_FLAG_BYTES,))
        if create:
            self.flags[:] = 0
        base = self.world_size * _FLAG_BYTES
        self.banks = [[np.ndarray((SLOT_BYTES,), dtype=np.uint8, buffer=buf,
                                  offset=base + (bank * self.world_size + r) * SLOT_BYTES)
                       for r in range(self.world_size)] for bank in (0, 1)]
        self.seq = 0
        self.peer_pids: list[int] = []  # filled by for_group

    @classmethod
    def for_group(cls, group: dist.ProcessGroup | None) -> Communicator:
        """The shared-memory communicator when every rank of ``group`` is on this host,
        else the gloo one."""
        plain = Communicator(group)
        if plain.world_size == 1 or not shm_supported():
            return plain
        peers = [None] * plain.world_size
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=group)
        if len({host for host, _ in peers}) != 1:
            return plain
        names = [f"backplane_tp_{uuid.uuid4().hex[:16]}" if plain.rank == 0 else None]
        dist.broadcast_object_list(names, src=plain._global_rank(0), group=group)
        comm = cls(group, names[0], create=plain.rank == 0) if plain.rank == 0 else None
        dist.barrier(group=group)  # the segment exists before the others attach
        if comm is None:
            comm = cls(group, names[0], create=False)
        comm.peer_pids = [pid for _, pid in peers]
        dist.barrier(group=group)  # ... and they attached before anyone may unlink it
        logger.info("cpu platform: shared-memory collectives for %d ranks (%s)",
                    comm.world_size, names[0])
        return comm

    # ------------------------------------------------------------ protocol
    def _wait(self, value: int) -> None:
        flags = self.flags
        spins = 0
        while int(flags.min()) < value:
            os.sched_yield()
            spins += 1
            if spins % _LIVENESS_EVERY == 0:
                self._check_peers(value)

    def _check_peers(self, value: int) -> None:
        """Raise when a rank that has not arrived is gone: it never will (a dead peer
        would otherwise keep every other rank spinning here forever)."""
        for rank, pid in enumerate(self.peer_pids):
            if rank != self.rank and self.flags[rank] < value and not _process_alive(pid):
                raise RuntimeError(
                    f"shared-memory collective: rank {rank} (pid {pid}) of the group is gone")

    def _publish(self, tensor: torch.Tensor) -> list[np.ndarray]:
        """Write ``tensor``'s bytes into this rank's slot of the next call's bank; returns
        that bank once every rank has written."""
        seq = self.seq + 1
        bank = self.banks[seq % 2]
        self._wait(seq - 1)
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
        bank[self.rank][: data.size] = data
        self.flags[self.rank] = seq
        self._wait(seq)
        self.seq = seq
        return bank

    def _fits(self, tensor: torch.Tensor) -> bool:
        return (tensor.device.type == "cpu"
                and tensor.numel() * tensor.element_size() <= SLOT_BYTES)

    def _slot(self, bank: list[np.ndarray], rank: int, like: torch.Tensor) -> torch.Tensor:
        nbytes = like.numel() * like.element_size()
        return torch.from_numpy(bank[rank][:nbytes]).view(like.dtype).view(like.shape)

    # ------------------------------------------------------------ collectives
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self._fits(tensor):
            return super().all_reduce(tensor)
        bank = self._publish(tensor)
        # A copy: the slots are read by every rank (.float() of a float32 slot is the slot).
        total = self._slot(bank, 0, tensor).to(torch.float32, copy=True)
        for r in range(1, self.world_size):
            total += self._slot(bank, r, tensor)
        tensor.copy_(total)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if not self._fits(tensor):
            return super().all_gather(tensor, dim)
        bank = self._publish(tensor)
        return torch.cat([self._slot(bank, r, tensor) for r in range(self.world_size)], dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._check_peer("broadcast", "src", src, allow_self=True)
        if not self._fits(tensor):
            return super().broadcast(tensor, src)
        bank = self._publish(tensor)
        if self.rank != src:
            tensor.copy_(self._slot(bank, src, tensor))
        return tensor

    def close(self) -> None:
        """Detach and remove the segment (idempotent)."""
        if self.shm is None:
            return
        shm, self.shm = self.shm, None
        self.flags = self.banks = None
        try:
            shm.close()
        except BufferError:
            pass  # a tensor still views the segment; the mapping goes with the process
        # Not shm.unlink(): it would unregister from the resource tracker a second time.
        try:
            os.unlink(os.path.join("/dev/shm", shm.name.lstrip("/")))
        except FileNotFoundError:
            pass  # another rank removed it first
