"""Tensor parallelism (spec section 6): process groups, launching, collectives, and the parts of
sharding that are not a scheme unit's business.

Every rank holds a slice of each projection (the scheme units slice weights and scales through
`LinearMethod.tp_slice`); the model adds one all-reduce after each row-parallel projection
(o_proj, down_proj), looks tokens up in a vocabulary-sharded embedding and all-gathers the
vocabulary-sharded logits. When there are more ranks than KV heads, each KV head is replicated
(`replicate_kv`) so that every rank holds the head its query heads read.

Launch: `launch(tp, fn, *args)` spawns tp processes (NCCL on GPU, gloo on CPU), or, under
torchrun, joins the group torchrun describes and runs fn in this process.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import io
import os
import socket
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, LowbitError


# ------------------------------------------------------------------ the group
def current() -> tuple[int, int]:
    """(rank, world size) of the tensor-parallel group; (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device() -> torch.device:
    """This rank's device: cuda:<local rank> when the group runs on GPUs, else cpu."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return torch.device("cpu")


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over the group, in place. A device-side collective (no host sync), so a
    CUDA graph captures it like the sum after each row-parallel projection."""
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def whole_k_amax(x: torch.Tensor, spec) -> torch.Tensor | None:
    """Per-row amax (float32 [..., 1]) of the activations x entering a row-parallel projection under
    tensor parallelism, taken over the whole K: each rank holds a slice of K, so its amax is
    all-reduced with MAX and every rank forms the dynamic scale tp=1 would. None for any other
    projection: x holds the whole K and the quantizer takes its own amax, with no collective."""
    if spec.parallel != "row" or spec.tp_size == 1:
        return None
    return all_reduce_max(x.abs().amax(dim=-1, keepdim=True).float())  # amax is exact in x's dtype


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along the last dimension (rank order)."""
    n = dist.get_world_size()
    out = torch.empty((n,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    dist.all_gather(list(out.unbind(0)), x.contiguous())
    return out.movedim(0, -2).reshape(*x.shape[:-1], n * x.shape[-1])


def check(cfg, tp: int, also: dict[str, int] | None = None, refused: dict[str, str] | None = None) -> None:
    """Refuse a tensor-parallel size the model cannot be split into. also: more config fields
    (name -> value) that must be multiples of tp (a family's heads, groups, expert sizes); refused:
    config fields whose setting does not split at all (name -> why)."""
    if tp == 1:
        return
    problems = [f"{name} is set ({why})" for name, why in (refused or {}).items()]
    if cfg.num_heads % tp:
        problems.append(f"num_attention_heads {cfg.num_heads} is not a multiple of tp={tp}")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        problems.append(f"num_key_value_heads {cfg.num_kv_heads} neither divides nor is a multiple of tp={tp}")
    if cfg.vocab_size % tp:
        problems.append(f"vocab_size {cfg.vocab_size} is not a multiple of tp={tp} (embedding and lm_head are "
                        f"split by vocabulary rows)")
    if cfg.intermediate_size % tp:
        problems.append(f"intermediate_size {cfg.intermediate_size} is not a multiple of tp={tp}")
    problems += [f"{name} {value} is not a multiple of tp={tp}" for name, value in (also or {}).items() if value % tp]
    if problems:
        raise ConfigError(f"{cfg.architecture} cannot run with tensor parallelism {tp}: {'; '.join(problems)}; "
                          f"pick a tp that divides them")


# ------------------------------------------------------------------ KV-head replication
def kv_replication(cfg, tp: int) -> int:
    """How many copies of each KV head the ranks need (1 unless tp > num_kv_heads)."""
    return tp // cfg.num_kv_heads if tp > cfg.num_kv_heads else 1


def is_qkv(slot) -> bool:
    """A q/k/v slot (its k and v shards hold KV heads)."""
    return slot.kv_heads > 0


def tp_slot(slot, cfg, tp: int):
    """The slot as the ranks see it: k and v shards widened by KV-head replication."""
    f = kv_replication(cfg, tp)
    if f == 1 or not is_qkv(slot):
        return slot
    q, k, v = slot.shard_sizes
    return dataclasses.replace(slot, shard_sizes=(q, k * f, v * f))


def replicate_kv(tensor: torch.Tensor, role: str, shard: int | None, disk_sizes: tuple[int, ...], cfg,
                 factor: int, where: str) -> torch.Tensor:
    """Repeat each KV head's rows of an on-disk q/k/v tensor `factor` times.

    shard 1/2: a k or v tensor; None: q, k and v fused on disk (only the k and v parts repeat).
    Row-indexed tensors are any whose first dimension covers the heads evenly (weights, row scales,
    biases, packed zero points, 128-row block scales of 128-wide heads); per-tensor scalars pass
    unchanged; `weight_shape` records the widened shape.
    """
    if factor == 1 or shard == 0:
        return tensor
    if role == "weight_shape":
        rows = sum(disk_sizes) if shard is None else disk_sizes[shard]
        grown = rows + (disk_sizes[1] + disk_sizes[2]) * (factor - 1) if shard is None else rows * factor
        return torch.tensor([grown, int(tensor.reshape(-1)[1])], dtype=tensor.dtype)
    if tensor.dim() == 0 or tensor.numel() == 1:
        return tensor
    heads = cfg.num_kv_heads
    if shard is None:
        total = tensor.shape[0]
        q, kv = disk_sizes[0], disk_sizes[1]
        if (total * q) % sum(disk_sizes) or (total * kv) % sum(disk_sizes):
            raise _cannot_replicate(where, role, tensor, heads)
        nq, nkv = total * q // sum(disk_sizes), total * kv // sum(disk_sizes)
        qp, kp, vp = tensor.split([nq, nkv, nkv])
        return torch.cat([qp, _repeat_heads(kp, heads, factor, where, role),
                          _repeat_heads(vp, heads, factor, where, role)])
    return _repeat_heads(tensor, heads, factor, where, role)


def _repeat_heads(t: torch.Tensor, heads: int, factor: int, where: str, role: str) -> torch.Tensor:
    if t.shape[0] % heads:
        raise _cannot_replicate(where, role, t, heads)
    return t.reshape(heads, t.shape[0] // heads, *t.shape[1:]).repeat_interleave(factor, 0).reshape(
        t.shape[0] * factor, *t.shape[1:])


def _cannot_replicate(where, role, t, heads) -> ConfigError:
    return ConfigError(f"{where}.{role}: shape {list(t.shape)} does not split into {heads} KV heads, so the heads "
                       f"cannot be replicated across more ranks than KV heads; use a tp of at most {heads}")


# ------------------------------------------------------------------ vocabulary-sharded embedding
class VocabParallelEmbedding(nn.Module):
    """Rows [rank*V/tp, (rank+1)*V/tp) of the embedding; tokens of other ranks contribute zeros,
    and one all-reduce assembles the lookup."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, tp_size: int = 1):
        super().__init__()
        self.tp_size = tp_size
        self.rows = vocab // tp_size
        self.start = current()[0] * self.rows if tp_size > 1 else 0
        self.weight = nn.Parameter(torch.full((self.rows, hidden), float("nan"), dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.rows)
        out = F.embedding(torch.where(inside, local, 0), self.weight)
        return all_reduce(out.masked_fill(~inside[..., None], 0))


# ------------------------------------------------------------------ launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, backend: str, port: int | None = None) -> None:
    """Join (or, under torchrun, take from the environment) the process group of this rank."""
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    init_method = f"tcp://127.0.0.1:{port}" if port else "env://"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(minutes=5))


def _dumps(value) -> bytes:
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _worker(rank, world, backend, port, fn, args, queue, timeout):
    if timeout:  # a rank still running just before the parent gives up prints where it is
        faulthandler.dump_traceback_later(max(1.0, timeout - 5))
    try:
        init(rank, world, backend, port)
        result = fn(*args)
        queue.put((rank, True, _dumps(result)))
    except BaseException as e:  # report to the parent, whatever it was
        msg = str(e) if isinstance(e, LowbitError) else traceback.format_exc()
        queue.put((rank, False, msg))
    finally:
        if dist.is_initialized() and dist.get_backend() == "nccl":
            # CUDA graphs that captured NCCL collectives keep the communicator referenced, and
            # destroy_process_group then waits forever (seen on 2xH200). The result is already in
            # the parent's hands: leave without tearing NCCL down.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(tp: int, fn, *args, backend: str | None = None, timeout: float | None = None) -> list:
    """Run fn(*args) on tp ranks; returns every rank's result (rank order).

    Under torchrun (WORLD_SIZE set) this process is one rank: it joins the group and returns
    [its own result]. Otherwise tp processes are spawned; fn must be importable (a module-level
    function) and its result picklable. timeout (seconds): give up on ranks that have not
    reported by then (each prints its Python stack to stderr first).
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        if world != tp:
            raise ConfigError(f"--tp {tp} but torchrun started {world} processes; make them equal")
        if not dist.is_initialized():
            init(int(os.environ["RANK"]), world, backend)
        return [fn(*args)]
    if backend == "nccl" and torch.cuda.device_count() < tp:
        raise ConfigError(f"--tp {tp} needs {tp} GPUs, this machine has {torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, tp, backend, port, fn, args, queue, timeout), daemon=True)
             for r in range(tp)]
    for p in procs:
        p.start()
    results, errors = {}, []
    start = time.monotonic()
    try:
        while len(results) + len(errors) < tp:
            if queue.empty():
                if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    errors.append(f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]})")
                    break
                if timeout and time.monotonic() - start > timeout:
                    silent = [r for r in range(tp) if r not in results]
                    errors.append(f"rank(s) {silent} gave no result within {timeout:.0f} s (their stacks are on "
                                  f"stderr)")
                    break
                procs[0].join(0.05)
                continue
            rank, ok, payload = queue.get()
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}: {payload}")
                break  # the others may be waiting in a collective for the failed rank
    finally:
        for p in procs:
            if errors:
                p.terminate()
            p.join(timeout=30)
            if p.is_alive():  # a rank stuck past its report must not hang the caller
                p.kill()
                p.join()
    if errors:
        raise LowbitError(f"tensor-parallel run failed: {errors[0]}")
    return [results[r] for r in range(tp)]
