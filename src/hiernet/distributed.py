"""torchrun support: process-group set-up, rank checks and small collectives.

Without torchrun (no ``WORLD_SIZE`` in the environment) every function is a cheap no-op, so the same
code runs on one CPU, one GPU or many.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes; return this rank's device.

    Uses NCCL on CUDA (one GPU per local rank) and Gloo on CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that writes outputs and logs (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` under torchrun, else ``model`` itself."""
    if not is_distributed() or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DDP(model, device_ids=ids)


def all_reduce_sum(values: list[float], device: str) -> list[float]:
    """Sum a few numbers over all ranks."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device if device.startswith("cuda") else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place (no-op without torchrun); Gloo gets a CPU copy."""
    if not is_distributed():
        return t
    if t.device.type == "cuda":
        dist.all_reduce(t)
        return t
    cpu = t.detach().cpu()
    dist.all_reduce(cpu)
    t.copy_(cpu)
    return t


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (other ranks' ``obj`` is ignored). For small pickles between the
    processes of one job (resume metadata, a run token)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` without torchrun."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def rank0_first():
    """Context manager: rank 0 runs the block first (e.g. a download into a shared cache), the other
    ranks wait at a barrier and then run it (finding the files rank 0 wrote)."""
    import contextlib

    @contextlib.contextmanager
    def _cm():
        if not is_main():
            barrier()
        try:
            yield
        finally:
            if is_main():
                barrier()

    return _cm()


SHARED_MARKER = ".hiernet-shared-check"


def check_shared_storage(folders: list) -> None:
    """Under torchrun: fail (one line, on every rank) unless every rank sees files rank 0 writes in ``folders``.

    Several hosts must share the feature cache and the output folder (rank 0 alone writes the node
    folder; every rank reads the cache). Rank 0 writes a marker with a fresh token in each folder; after
    a barrier the other ranks look for it.
    """
    import socket
    import uuid
    from pathlib import Path

    from .safeio import UserError

    if not is_distributed():
        return
    token = broadcast_object(uuid.uuid4().hex)
    folders = [Path(f) for f in folders if f is not None]
    if is_main():
        for f in folders:
            f.mkdir(parents=True, exist_ok=True)
            (f / f"{SHARED_MARKER}-{token}").write_text(token)
    barrier()
    missing = [str(f) for f in folders if not (f / f"{SHARED_MARKER}-{token}").is_file()]
    report = all_gather_object((rank(), socket.gethostname(), missing))
    barrier()
    if is_main():
        for f in folders:
            (f / f"{SHARED_MARKER}-{token}").unlink(missing_ok=True)
    bad = [(r, host, m) for r, host, m in report if m]
    if bad:
        r, host, m = bad[0]
        raise UserError(f"{', '.join(m)} is not shared storage: rank {r} on {host} cannot see the files rank 0 wrote; "
                        "put --output-dir and --cache-dir on a filesystem every host mounts")


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
