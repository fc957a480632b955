"""What the training recipes share: the DDP process group, RNG state, the torch thread guard, the metrics log
and the saved config, so the encoder and the LLM recipes resume, log and scale the same way."""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rag_ecg.config import to_yaml
from rag_ecg.errors import BackendError, ConfigError
from rag_ecg.io import append_jsonl, atomic_write
from rag_ecg.redact import is_masked, mask_url, redact


# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    """Where this process sits in a DDP job (torchrun / accelerate launch set the env vars)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = None  # torch.device this rank computes on

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Single process by default; a DDP process group when WORLD_SIZE > 1 (NCCL on CUDA, Gloo on CPU).

    `device`: auto (CUDA when visible) | cpu | cuda | cuda:N; under DDP each rank takes cuda:LOCAL_RANK.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise BackendError(f"device={device}: no CUDA GPU visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=torch.device(device if device.startswith("cuda") else "cuda" if use_cuda else "cpu"))
    import torch.distributed as tdist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def all_reduce_sum(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    """`value` summed over ranks, in place (unchanged in a single process)."""
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.all_reduce(value)
    return value


def broadcast_int(value: int, dist: Dist) -> int:
    """Rank 0's `value` on every rank."""
    if dist.world <= 1:
        return value
    import torch.distributed as tdist

    t = torch.tensor([value], device="cuda" if torch.cuda.is_available() else "cpu")
    tdist.broadcast(t, src=0)
    return int(t.item())


def gather_objects(obj: Any, dist: Dist) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if dist.world <= 1:
        return [obj]
    import torch.distributed as tdist

    out: list = [None] * dist.world
    tdist.all_gather_object(out, obj)
    return out


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()


def shutdown_distributed(dist: Dist) -> None:
    """Wait for every rank, then leave the process group."""
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) global RNG state as plain data + uint8 tensors: a checkpoint holding it
    loads with `torch.load(weights_only=True)`."""
    v, inner, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [v, list(inner), gauss], "torch": torch.get_rng_state(),
          "numpy": {"name": name, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                    "cached": float(cached)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore what `rng_state` captured (keys it lacks, e.g. from older checkpoints, are left alone)."""
    if "python" in st:
        v, inner, gauss = st["python"]
        random.setstate((v, tuple(inner), gauss))
    if "numpy" in st:
        s = st["numpy"]
        np.random.set_state((s["name"], np.array(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"], s["cached"]))
    if "torch" in st:
        torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---------------------------------------------------------------------------------------------- threads
@contextmanager
def thread_guard(threads: int = 0) -> Iterator[None]:
    """Run with `threads` torch intra-op threads (0: leave as is) and give the caller back its own setting.

    Oversubscribed OpenMP threads spin at barriers: tiny matmuls beside render workers on a few shared cores
    run 5-100x slower with one thread too many. (OpenCV is pinned to one thread where rag_ecg imports it.)
    """
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- crash tests
def kill_point(name: str) -> None:
    """SIGKILL this process here when `RAG_ECG_KILL_AT` names this point: the crash tests kill a run at a
    known place (a kill at a random moment would test nothing reproducibly); unset, it does nothing."""
    if os.environ.get("RAG_ECG_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- outputs
def plain(obj: Any) -> Any:
    """NumPy scalars and arrays inside `obj` as Python numbers and lists (what JSON can hold)."""
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


class MetricsLog:
    """metrics.jsonl: one JSON object a line, appended and flushed; silent where `active` is False (ranks > 0)."""

    def __init__(self, path: Path, active: bool = True, timestamps: bool = False):
        self.path, self.active, self.timestamps = Path(path), active, timestamps
        if active:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.active:
            append_jsonl(self.path, plain({"time": round(time.time(), 3), **record} if self.timestamps else record))


def save_config(cfg: Any, path: Path) -> None:
    """The resolved dataclass config as YAML beside the run's outputs (what `load_config` reads back), its
    secrets masked (`rag_ecg.redact`): a run folder is shared and copied, a store's password must not go
    with it. A resume from this file gets the real URL back from the command line or env (`real_url`)."""
    values = dataclasses.asdict(cfg)
    masked = redact(values)
    hidden = {k: v for k, v in masked.items() if v != values[k]}
    atomic_write(path, to_yaml(dataclasses.replace(cfg, **hidden) if hidden else cfg))


def real_url(url: str | None, field: str, flag: str, env: str = "RAG_ECG_DB") -> str | None:
    """`url`, or, when it is one a saved config masked (a resume from the run's own config), the real one:
    `env` when it names the same store; else a one-line ConfigError saying what to pass."""
    if not is_masked(url):
        return url
    given = os.environ.get(env)
    if given and mask_url(given) == url:
        return given
    other = f" ({env} names another store: {mask_url(given)})" if given else ""
    raise ConfigError(f"{field}: {url} was saved with its password hidden; pass the real URL with {flag} or "
                      f"set {env} to it{other}")
