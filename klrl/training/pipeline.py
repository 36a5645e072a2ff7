"""Real asynchronous RL: generation runs ahead of the trainer in a separate process (async_mode=pipeline).

The generator rebuilds the task and the model from the config and produces the batch of each step with the
trainer's own `collect` and `behaviour_logprobs`, using the newest weights the trainer has published. It may start
step s only once version s - k exists (k = async_level), so no batch is more than k optimizer steps stale and at
most k batches wait ahead of the trainer. Unlike klrl.training.lag (the deterministic simulation), the staleness of each
step depends on timing.

Weights travel through one shared-memory copy of the state dict, guarded by a condition variable with the version
number. Batches come back serialized over a pipe written by the generator's main thread: no feeder threads and no
shared-memory handles in flight, so closing the pipe always unblocks both ends, and a half-written message ends in
EOF rather than a hang.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import traceback

import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

POLL_S = 0.5  # how often blocked waits look for a stop request or a dead peer


class PipelineError(RuntimeError):
    pass


def _serialize(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _exit_when_orphaned(parent_pid: int) -> None:
    # A SIGKILLed trainer runs no cleanup; without this the generator would keep a core (or a GPU) busy forever.
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _generator_main(cfg_dict, shared, cond, version, stop, conn, start_step: int, threads: int, parent_pid: int):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the trainer decides when we stop
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    step = start_step
    try:
        from klrl.training.distributed import local_device
        from klrl.sampling.generation import make_generator
        from klrl.models.registry import load_model
        from klrl.tasks import TASKS
        from klrl.sampling.batch import behaviour_logprobs, collect

        torch.set_num_threads(threads)
        cfg = OmegaConf.create(cfg_dict)
        k = cfg.async_level
        task = TASKS[cfg.task.name](cfg.task, cfg.seed)
        model, tokenizer = load_model(cfg.model, task, cfg.task, cfg.cache_dir)
        model.to(local_device(cfg.device)).eval().requires_grad_(False)
        generator = make_generator(cfg, model, tokenizer)  # hf: config.validate refuses vllm with the pipeline
        loaded = None
        while True:
            with cond:
                while version.value < step - k and not stop.is_set():
                    cond.wait(POLL_S)
                if stop.is_set():
                    return
                v = version.value
                if v != loaded:
                    model.load_state_dict(shared)
                    loaded = v
            batch = collect(step, cfg, generator, tokenizer, task)
            t0 = time.perf_counter()
            batch.old_logp = behaviour_logprobs(model, batch, cfg.algo.micro_batch_size or len(batch.rewards),
                                                cfg.generation.temperature, cfg.generation.top_p).cpu()
            batch.gen_time += time.perf_counter() - t0
            conn.send_bytes(_serialize(("batch", step, v, batch)))
            step += 1
    except (BrokenPipeError, EOFError):
        return  # the trainer closed its end: it no longer wants batches
    except BaseException:
        try:
            conn.send_bytes(_serialize(("error", step, None, traceback.format_exc())))
        except OSError:
            pass
        raise


class Pipeline:
    """The trainer's side: `get(step)` the next batch, `publish(version, model)` after each optimizer step, `close()`."""

    def __init__(self, cfg: DictConfig, model: torch.nn.Module, start_step: int):
        self.k = cfg.async_level
        self.next_step = start_step
        self._stats: dict = {}
        self._t_get = 0.0
        self._proc = None
        self._conn = None
        # Two processes now share the cores. A config that sets threads per process (model.cpu_threads) gets them in
        # both; otherwise each gets half of the trainer's, so that overlapping them does not oversubscribe the CPU.
        self._trainer_threads = torch.get_num_threads()
        per_process = cfg.model.get("cpu_threads")
        gen_threads = per_process or max(1, self._trainer_threads // 2)
        ctx = mp.get_context("spawn")
        self._shared = {k: v.detach().to("cpu", copy=True).share_memory_() for k, v in model.state_dict().items()}
        self._cond = ctx.Condition()
        self._version = ctx.RawValue("q", start_step)  # guarded by _cond; the trainer's weights at start = start_step
        self._stop = ctx.Event()
        self._conn, child_conn = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_generator_main,
            name="klrl-generator",
            args=(OmegaConf.to_container(cfg, resolve=True), self._shared, self._cond, self._version, self._stop,
                  child_conn, start_step, gen_threads, os.getpid()),
            daemon=True,  # terminated by multiprocessing's exit handler should close() never run
        )
        try:
            self._start_ignoring_sigint()
            self.pid = self._proc.pid
            child_conn.close()  # the child holds the only write end: its death reads as EOF here
            if not per_process:
                torch.set_num_threads(max(1, self._trainer_threads - gen_threads))
        except BaseException:
            self.close()
            raise

    def _start_ignoring_sigint(self) -> None:
        # An ignored SIGINT survives exec, so a Ctrl-C during the child's imports does not kill it mid-start either.
        if threading.current_thread() is not threading.main_thread():
            self._proc.start()
            return
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._proc.start()
        finally:
            signal.signal(signal.SIGINT, old)

    def get(self, step: int):
        """The batch for `step`, with old_logp from the snapshot that generated it and its staleness."""
        if step != self.next_step:
            raise PipelineError(f"pipeline: asked for step {step}, but the generator produces step {self.next_step} next")
        t0 = self._t_get = time.perf_counter()
        while not self._conn.poll(POLL_S):
            if not self._proc.is_alive() and not self._conn.poll(0):
                raise PipelineError(f"generator process died (exit code {self._proc.exitcode}) before step {step}")
        try:
            kind, s, v, payload = torch.load(io.BytesIO(self._conn.recv_bytes()), weights_only=False)
        except EOFError:
            self._proc.join(5)
            raise PipelineError(f"generator process died (exit code {self._proc.exitcode}) before step {step}") from None
        if kind == "error":
            raise PipelineError(f"generator process failed at step {s}:\n{payload}")
        if s != step or not 0 <= step - v <= self.k:
            raise PipelineError(f"pipeline: got the batch of step {s} (weights of version {v}) for step {step}")
        payload.staleness = step - v
        self.next_step = step + 1
        self._stats = {"time/wait": time.perf_counter() - t0}
        return payload

    def publish(self, version: int, model: torch.nn.Module) -> None:
        """Make the trainer's weights after `version` optimizer steps the generator's newest snapshot."""
        t0 = time.perf_counter()
        # A lock held by a process that died is never released: wait in slices and check the generator is alive.
        while not self._cond.acquire(timeout=POLL_S):
            if not self._proc.is_alive():
                raise PipelineError(f"generator process died (exit code {self._proc.exitcode})")
        try:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    self._shared[k].copy_(v)
            self._version.value = version
            self._cond.notify_all()
        finally:
            self._cond.release()
        now = time.perf_counter()
        # time/step of the sequential trainer adds generation to training; here they overlap, so report wall time.
        self._stats.update({"time/publish": now - t0, "time/step": now - self._t_get})

    def stats(self) -> dict:
        """Timings of the last step: time/wait (blocked on generation), time/publish, time/step (wall clock)."""
        return dict(self._stats)

    def close(self) -> None:
        """Stop the generator and reap it: ask, then terminate, then kill. Safe to call twice."""
        if self._proc is None:
            return
        self._stop.set()
        if self._cond.acquire(timeout=1.0):  # a wake-up only: the generator also polls the stop event
            self._cond.notify_all()
            self._cond.release()
        if self._conn is not None:
            self._conn.close()  # a generator blocked sending a batch gets a broken pipe
        if self._proc.pid is not None:
            for end in (None, self._proc.terminate, self._proc.kill):
                if end is not None:
                    end()
                self._proc.join(10 if end is None else 5)
                if not self._proc.is_alive():
                    break
        torch.set_num_threads(self._trainer_threads)
        self._proc = None
