"""What every training loop here shares: processes, the JSONL log, resume checks, the NaN guard,
stopping on a signal."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from ..artifacts import atomic_write_bytes
from ..errors import Interrupted, UserError
from ..runtime import SEED_MAX, local_device


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); under torchrun, joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, local_device(device)


def gather_objects(obj, world: int) -> list:
    """`obj` of every rank, in rank order (a list of one without torchrun)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# Rules for numeric flags: a test and its words for the error (NaN and infinity pass none).
AT_LEAST_ONE = (lambda v: v >= 1, "at least 1")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
POSITIVE = (lambda v: v > 0, "> 0")
SEED = (lambda v: 0 <= v <= SEED_MAX, f"in [0, {SEED_MAX}]")


def check_values(cfg, rules: dict) -> None:
    """Refuse the first flag of `cfg` (a config object, or a dict of values) whose value breaks its
    rule in `rules` (name -> (test, words))."""
    values = cfg if isinstance(cfg, dict) else vars(cfg)
    for name, (allowed, words) in rules.items():
        value = values[name]
        if not (math.isfinite(value) and allowed(value)):
            raise UserError(f"--{name.replace('_', '-')} must be {words}, got {value}")


def check_run_folder(out: Path, checkpoint: str, resume: bool | str, kind: str, run_files: Sequence[str],
                     command: str) -> bool:
    """--out of a training run: new, empty or this command's run folder. Another artifact, or files
    the run does not write, are refused (a folder with a checkpoint is a run, whatever else is in
    it); so are overwriting a finished artifact or an unfinished run, and a --resume with nothing
    to resume. `resume` "auto" (--auto-resume) resumes the run there is, else starts one. Returns
    whether to resume."""
    from ..artifacts import check_output_folder, made_by

    run = (out / checkpoint).is_file()
    if resume == "auto":
        resume = run
    made = check_output_folder(out, kind, ["*"] if run or resume else run_files, command)
    if made is not None and not run:  # imported, or a kept step: weights without what training needs
        raise UserError(f"{out} holds a model{made_by(made)} without the {checkpoint} to train it on; pass another "
                        f"--out (--init {out} starts from its weights)")
    if made is not None and not resume:
        raise UserError(f"{out} already holds a finished run; pass --resume with a larger --steps to train on, or "
                        f"another --out")
    if run and not resume:
        raise UserError(f"{out} holds an unfinished run; pass --resume to continue it, or another --out")
    if resume and not run:
        raise UserError(f"--resume: no {checkpoint} in {out}; start without --resume")
    return resume


def already_trained(out: Path, step: int, steps: int, rank: int) -> bool:
    """After resuming at `step`: True when a finished run already has `steps` (a requeued job: nothing
    to do). A smaller --steps is refused; at `steps` without the artifact (stopped while writing
    it) the loop is skipped and the artifact written; a larger one trains on, and the finished
    artifact gives way."""
    from ..artifacts import MANIFEST
    from ..console import console

    if step > steps:
        raise UserError(f"{out} is already trained for {step} steps; pass a larger --steps to train on")
    if step == steps and (out / MANIFEST).is_file():
        console.print(f"{out} is already trained for {step} steps; nothing to do", soft_wrap=True)
        return True
    if rank == 0:
        (out / MANIFEST).unlink(missing_ok=True)  # training on: never a manifest over other weights
    return False


def check_resume_config(saved: dict, current: dict, may_change: set[str]) -> None:
    # An input recorded by its id besides its path is an argument: latents_id reads `LATENTS id A (now B)`.
    changed = [f"{k.removesuffix('_id').upper() + ' id' if k.endswith('_id') else '--' + k.replace('_', '-')} {v} "
               f"(now {current.get(k)})" for k, v in saved.items() if k not in may_change and current.get(k) != v]
    if changed:
        raise UserError(f"--resume with other values than the run had: {', '.join(changed)}; resume with the original flags")


def save_checkpoint(path: Path, step: int, config: dict, objects: dict, world: int, results: dict | None = None) -> None:
    """Everything a run needs to continue bit-for-bit: each object's state dict, the step,
    the config and every rank's RNG states (collective: every rank calls it; rank 0 writes).
    `results`: rank 0's values of this step that the finished artifact reports (the loss), for
    a run resumed after its last step, which computes none."""
    from ..artifacts import save_state
    from ..runtime import rng_state

    rngs = gather_objects(rng_state(), world)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_state(path, {"step": step, "config": config, "rng": rngs, "results": results or {},
                          **{k: v.state_dict() for k, v in objects.items()}})


def load_checkpoint(path: Path, config: dict, objects: dict, may_change: set[str], rank: int) -> tuple[int, dict]:
    """Restore what `save_checkpoint` saved into `objects` and this rank's RNG; returns the step
    and the results saved with it (none in checkpoints older than them)."""
    from ..artifacts import load_state
    from ..runtime import set_rng_state

    state = load_state(path)
    check_resume_config(state["config"], config, may_change)
    for name, obj in objects.items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"][rank])
    return state["step"], state.get("results", {})


class FiniteGuard:
    """Stops a run whose loss stopped being finite, with a one-line error naming the first
    bad step. `observe` runs every step on the device, without the host sync that a
    per-step `if` would cost; `check` (at log steps and before every checkpoint, so that
    no checkpoint holds the broken weights) reads the verdict back.
    """

    def __init__(self, device: torch.device, checkpoint: Path, remedies: str):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.checkpoint, self.remedies = checkpoint, remedies

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def check(self) -> None:
        step = int(self.first_bad)
        if step >= 0:
            where = f"last good checkpoint: {self.checkpoint}" if self.checkpoint.is_file() else "no checkpoint was written yet"
            raise UserError(f"the loss stopped being finite at step {step} ({where}); "
                            f"resume with --resume and try {self.remedies}")


class SignalStop:
    """Ctrl-C or SIGTERM (a cluster's preemption or time limit) asks a training loop to stop
    before its next step and save a checkpoint, so that --resume loses nothing; a second Ctrl-C
    stops at once (a second SIGTERM, as torchrun forwards the one the cluster sent, does not).

    The DataLoader workers may die of the signal (torch's workers do on SIGTERM): once it has
    come, their deaths no longer raise in the middle of a step, and `next_batch` gives None
    for a batch they could not deliver. With several processes the ranks must stop at the same
    step (saving is collective): `now` compares their flags every step, on the CPU over gloo,
    so no rank waits for its GPU, and within torchrun's 30 s between signal and kill."""

    def __init__(self, world: int):
        self.world, self.requested = world, None  # the name of the signal, once one came
        # Every rank builds it at the same point: creating a group is collective.
        self._group = None if world == 1 or dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._announced = False

    def __enter__(self) -> "SignalStop":
        self._owner, self._previous = os.getpid(), {}
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def _handle(self, signum: int, frame) -> None:
        # Only a flag and a handler swap here: printing from a signal handler can re-enter stderr.
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested or os.getpid() != self._owner:  # a forked DataLoader worker keeps serving
            return
        self.requested = signal.Signals(signum).name
        if hasattr(signal, "SIGCHLD"):  # torch's handler would raise, mid-step, for a worker the signal killed
            self._previous.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))

    def next_batch(self, batches: Iterator):
        """The next batch; None if the signal has come and the workers could not deliver it."""
        try:
            return next(batches)
        # A worker killed by the signal: "DataLoader worker ... exited unexpectedly" (RuntimeError),
        # or, killed while handing over a batch's shared memory, a reset connection (OSError, EOFError).
        except (RuntimeError, OSError, EOFError):
            if not self.requested:
                raise
            return None

    def now(self) -> bool:
        """Whether to stop before this step: on every rank, or on none."""
        stop = bool(self.requested)
        if self.world > 1:
            flag = torch.tensor([float(stop)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            stop = bool(flag.item())
        if stop and not self._announced and (self.world == 1 or dist.get_rank() == 0):
            from ..console import warn

            warn(f"{self.requested or 'a signal to another rank'}: saving a checkpoint and stopping "
                 f"(Ctrl-C again to stop at once)")
            self._announced = True
        return stop

    def stopped(self, step: int, checkpoint: Path) -> Interrupted:
        # A rank stopped by another rank's signal has none of its own: it reports SIGTERM, a scheduler's.
        signum = signal.Signals[self.requested] if self.requested else signal.SIGTERM
        return Interrupted(f"stopped at step {step}; {checkpoint} holds it: continue with the same command and --resume",
                           signum)


class StepLog:
    """log.jsonl lines with throughput; where stderr is not a terminal (a log file, a
    Makefile), the same line is printed, since the progress bar is not drawn there."""

    def __init__(self, path: Path, images_per_step: int, step: int, train_flops_per_image: float | None = None):
        self.path, self.images_per_step, self.flops = path, images_per_step, train_flops_per_image
        self.step, self.time = step, time.perf_counter()

    def write(self, step: int, terms: dict) -> None:
        from ..console import console

        now = time.perf_counter()
        record = {"step": step, **terms, "img_per_s": self.images_per_step * (step - self.step) / (now - self.time)}
        if self.flops:  # model FLOPs, all ranks together: divide by the GPUs' peak for the MFU
            record["tflop_per_s"] = record["img_per_s"] * self.flops / 1e12
        self.step, self.time = step, now
        append_log(self.path, record)
        if not console.is_terminal:
            console.print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                          soft_wrap=True)


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint being resumed: they will be written again."""
    if path.is_file():
        kept = [json.dumps(r) + "\n" for r in read_log(path) if r["step"] <= step]
        atomic_write_bytes(path, "".join(kept).encode())
