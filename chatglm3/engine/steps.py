"""One step's work on the engine's worker thread: prefill chunks and a decoding step of every
running request, in one packed forward pass where the model runner packs (a CPU), else a
prefill chunk's pass and then a decoding pass; the scheduler (scheduler.py) says what runs, the
model runner (model_runner.py) runs it, the output processor (output.py) takes its tokens, and
the row allocator (rows.py) keeps what finished requests leave. A failure fails the requests of
that pass alone: the engine serves on (out of memory: what they held is given back first).
"""

from __future__ import annotations

import logging

import torch

from ..errors import OutOfMemory
from ..model.model_runner import ModelRunner
from .output import OutputProcessor
from .rows import RowAllocator
from .scheduler import PrefillChunk, Request, Scheduler, StepPlan
from ..model.step_outputs import ChunkOutput, StepOutput

log = logging.getLogger("chatglm3.engine")


class Steps:
    """The worker's two kinds of step, and counts of the decoding steps run (stats())."""

    def __init__(self, scheduler: Scheduler, rows: RowAllocator, runner: ModelRunner,
                 output: OutputProcessor) -> None:
        self.scheduler, self.rows, self.runner, self.output = scheduler, rows, runner, output
        self.decode_steps = 0  # decoding steps run since the start
        self.decoded_tokens = 0  # tokens they made: / decode_steps = the mean batch

    def run(self, plan: StepPlan) -> None:
        """The plan's prefill chunks and a decoding step of the running requests: one packed
        pass when the runner packs and there is more than one thing to run, else a pass each."""
        if plan.prefills and self.scheduler.pack and (len(plan.prefills) > 1
                                                      or self.scheduler.running):
            self.packed(plan.prefills)
            return
        for chunk in plan.prefills:
            self.prefill(chunk)
        if self.scheduler.running:
            self.decode()

    def packed(self, chunks: list[PrefillChunk]) -> None:
        """Chunks and a decoding step in one pass. If it fails, its prompts fail with the
        error, and the running requests' decoding step runs again on its own (the pass took no
        token of theirs; the keys/values it wrote are written again at the same positions), so
        a prompt that is too large fails alone, as it would in a pass of its own."""
        sched = self.scheduler
        live = [c for c in chunks if not c.request.cancelled.is_set()]
        dropped = [c for c in chunks if c not in live]
        error: Exception | None = None
        try:
            # Prefix cache entries are copied out before anything may evict one (ending a
            # cancelled request stores its own entry).
            for c in live:
                self._begin(c.request)
            for c in dropped:
                self._end_prefill(c.request, "cancelled")
            self._release_cancelled()
            if not live:
                if sched.running:
                    self.decode()
                return
            out = self.runner.packed(live, sched.running)
        except torch.OutOfMemoryError:
            # Not kept: the error's traceback holds the forward pass's tensors until the
            # memory is given back below.
            log.warning("out of memory in a packed step", exc_info=True)
        except Exception as e:  # noqa: BLE001 - reported to its requests, serving goes on
            self.rows.drop_entries()  # it may have failed halfway through moving an entry
            error = e
        else:
            if out.decoded is not None:
                self._decoded(out.decoded)
            for c, chunk_out in zip(live, out.chunks):
                self._prefilled(c, chunk_out)
            return
        for c in live:
            self._abandon(c.request)
        if error is None:
            n = sum(len(c.request.prompt) for c in live)
            error = OutOfMemory(self._out_of_memory(
                f"prefill of a {n:,}-token prompt" if len(live) == 1
                else f"prefill of {len(live)} prompts ({n:,} tokens)"))
        for c in live:
            c.request.output.finish("error", error)
        if sched.running:
            self.decode()

    def prefill(self, chunk: PrefillChunk) -> None:
        """One prefill chunk; at the prompt's end the first token, then a row (or the end).
        An error fails this request alone; serving goes on."""
        r, sched = chunk.request, self.scheduler
        try:
            if r.cancelled.is_set():
                self._end_prefill(r, "cancelled")
                return
            self._begin(r)
            self._prefilled(chunk, self.runner.prefill(chunk))
            return
        except torch.OutOfMemoryError:
            log.warning("out of memory in a prefill chunk", exc_info=True)
        except Exception as e:  # noqa: BLE001 - reported to the request, serving goes on
            self.rows.drop_entries()  # it may have failed halfway through moving an entry
            self._abandon(r)
            r.output.finish("error", e)
            return
        # Out of memory, handled out here: inside the except block the error's traceback
        # still holds the forward pass's tensors.
        self._abandon(r)
        error = self._out_of_memory(f"prefill of a {len(r.prompt):,}-token prompt")
        r.output.finish("error", OutOfMemory(error))

    def _begin(self, r: Request) -> None:
        """r's prefill tensors at its first chunk, with the prefix cache positions it reuses."""
        if r.tensors is None and r.reuse[1]:
            self.output.reused(r, r.reuse[1])
            log.debug("prefix cache: %d of %d prompt positions from row %d", r.reuse[1],
                      len(r.prompt), r.reuse[0])
        self.runner.begin(r)

    def _prefilled(self, chunk: PrefillChunk, out: ChunkOutput) -> None:
        """A chunk ran: its prompt scores; at the prompt's end its first token, then a row
        (or the end)."""
        r = chunk.request
        self.scheduler.prefilled(chunk)
        if out.scores:
            self.output.scored(r, out.scores)
        first = out.first
        if first is None:
            return
        if self.output.take(r, first.token, first.logprob):
            # Done at its first token (max_tokens 1, a stop token): still worth keeping.
            self._end_prefill(r, None)
            return
        row, moves = self.scheduler.end_prefill(r, admit=True)
        self.runner.admit(r, row, moves)

    def _end_prefill(self, r: Request, reason: str | None) -> None:
        """r ends before it gets a row: its prefill cache becomes a prefix cache entry."""
        row = self.rows.keep_prefill(r.prompt, self.runner.prefill_length(r))
        if row is not None:
            self.runner.store_entry(r, row)
        self._abandon(r)
        if reason is not None:
            r.output.finish(reason)

    def _abandon(self, r: Request) -> None:
        r.tensors = None
        self.scheduler.abandon(r)

    def decode(self) -> None:
        """One decoding step of every running request; an error fails them all (they share
        the step), and serving goes on."""
        sched = self.scheduler
        try:
            self._release_cancelled()
            if not sched.running:
                return
            self._decoded(self.runner.decode(sched.running))
            return
        except torch.OutOfMemoryError:
            log.warning("out of memory in a decoding step", exc_info=True)
        except Exception as e:  # noqa: BLE001
            for r in sched.fail_running():
                r.output.finish("error", e)
            self.rows.drop_entries()  # it may have failed halfway through a row swap
            return
        failed = sched.fail_running()
        n = len(failed)
        error = self._out_of_memory(f"a decoding step of {n} request{'s' if n != 1 else ''}")
        for r in failed:
            r.output.finish("error", OutOfMemory(error))

    def _release_cancelled(self) -> None:
        """The cancelled running requests out of their rows, before a step runs."""
        gone, moves = self.scheduler.release_cancelled()
        self.runner.apply(moves)
        for r in gone:
            r.output.finish("cancelled")

    def _decoded(self, out: StepOutput) -> None:
        """A decoding step's tokens to their requests (running[i] -> out.tokens[i]); the
        finished ones leave their rows."""
        sched = self.scheduler
        sched.stepped()
        self.decode_steps += 1
        self.decoded_tokens += len(out.tokens)
        for i, token in reversed(list(enumerate(out.tokens))):
            if self.output.take(sched.running[i], token, out.logprobs and out.logprobs[i]):
                self.runner.apply(sched.finished(i))

    def _out_of_memory(self, during: str) -> str:
        """Frees what the failed requests held (they have let go of it); returns the message
        to fail each of them with."""
        idle = not self.scheduler.running
        if idle:
            self.rows.drop_entries()
        self.runner.out_of_memory(idle)
        where = "GPU memory" if self.runner.device.type == "cuda" else "memory"
        return (f"out of {where} during {during}; the request was dropped and the server goes "
                "on (a shorter prompt or fewer max_tokens may fit, or retry when it is less busy)")
