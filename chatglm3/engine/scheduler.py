"""The scheduler: host only (no torch). It keeps the waiting queue and the prefilling and
running requests, each with an explicit status, and decides each step: which waiting request
starts, which chunk of its prompt runs, which rows decode. The engine asks it for a `StepPlan`,
has the model runner carry it out, and hands the sampled tokens' outcome back (`finished`).

Rules:
- First in, first out: a waiting request starts once a row is free (every row holds a whole
  request's worst case, so no request could start sooner by overtaking, and none is passed over).
- Each step prefills at most `prefill_budget` prompt tokens while requests decode (vLLM's
  chunked-prefill token budget): a running stream then waits at most one such chunk for its
  next token, not a whole PREFILL_CHUNK (docs/benchmarks.md, "Scheduling", has the measurement). With none
  decoding, a step takes up to `prefill_chunk`.
- `pack` (the model runner can run several prompts' chunks and the decoding rows in one forward
  pass: model_runner.ModelRunner.packs): the budget counts the decoding tokens too (a pass of
  512 is then 512 rows, a PREFILL_BUCKETS length: no padding), the rest goes to the prefilling
  requests in arrival order, and waiting requests start while it lasts and a row is left for
  each, so requests that arrive together prefill together. Without it one request prefills
  at a time, and the budget is its chunk's.
- A cancelled request leaves at its next step: waiting, prefilling or running.

Why not transformers' own continuous batching (`model.init_continuous_batching()`, checked in
transformers 5.24, generation/continuous_batching/): it cannot serve this API's requests.
- No per-request seed: tokens are drawn with `torch.multinomial` on the process-wide generator
  (ModelRunner._sample), seeded once per manager (ContinuousBatchingConfig.seed ->
  DistributedHelper.set_tp_seed -> torch.manual_seed); a request's draws depend on what else
  runs, so a reported seed would not reproduce its output.
- Greedy and sampled requests cannot share a batch: `do_sample` is read once from the
  GenerationConfig (ContinuousBatchProcessor.do_sample) and ModelRunner._sample applies
  multinomial or argmax to every row.
- The repetition penalty is dropped: RepetitionPenaltyLogitsProcessor says
  `supports_continuous_batching = False`, and ContinuousBatchingLogitsProcessorList removes
  it (drop_unsupported_processors defaults to True); kept, it would be one value for all
  requests (only temperature, top-k and top-p have per-request versions, and only with
  per_request_processors=True).
Its paged cache and scheduler also replace what this engine plans and checks itself (one KV
budget sized at setup, admission, out-of-memory handling), and it switches attention to
flash-attention kernels where they are installed (auto_switch_to_flash), which the
official-output tests do not cover.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .rows import Move, RowAllocator

if TYPE_CHECKING:  # sampling.py needs torch; this module must not
    from ..model.sampling import RequestSampling


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no row yet
    PREFILLING = "prefilling"  # its prompt runs chunk by chunk
    RUNNING = "running"  # decoding in a row
    FINISHED = "finished"


class RequestOutput(Protocol):
    """A request's way out (output.OutputStream; the output processor's): what the engine's
    other layers may do with it. (A Protocol: output.py imports this module.)"""

    def finish(self, reason: str, error: BaseException | None = None) -> None: ...


class PrefillTensors(Protocol):
    """A prefilling request's tensors (model_runner._Prefill; the model runner's alone)."""

    prompt_ids: Any  # torch.Tensor [1, prompt]: the prompt on the device
    cache: Any  # transformers.DynamicCache: its own keys/values until it gets a row


class Request:
    """One request's scheduling state. `output` is the output processor's (text, result);
    `sampling` and `tensors` the model runner's: the scheduler reads none of them."""

    def __init__(self, prompt: list[int], output: RequestOutput | None = None,
                 sampling: RequestSampling | None = None,
                 output_ids: list[int] | None = None, whole_prompt: bool = False) -> None:
        self.prompt = prompt
        # Every prompt position runs (its logits are scored): no prefix cache entry is read.
        self.whole_prompt = whole_prompt
        self.output = output
        self.sampling = sampling
        self.status = Status.WAITING
        self.cancelled = threading.Event()
        self.prefilled = 0  # prompt positions whose keys/values are computed (or reused)
        self.length = len(prompt)  # ids so far: the prompt and the output tokens taken
        self.last_token = prompt[-1]  # the id the next decoding step feeds in
        self.kv_len = 0  # positions whose keys/values are written (set when a token is taken)
        self.output_ids: list[int] = [] if output_ids is None else output_ids
        self.tensors: PrefillTensors | None = None
        self.reuse = (-1, 0)  # (row, n): the prefix cache entry its prefill starts from

    def ids(self) -> list[int]:
        return self.prompt + self.output_ids

    def take(self, token: int) -> None:
        """Records an output token (not a stop token): the next step feeds it in."""
        self.output_ids.append(token)
        self.last_token = token
        self.length += 1


@dataclass
class PrefillChunk:
    request: Request
    begin: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == len(self.request.prompt)


@dataclass
class StepPlan:
    """What one step does: requests that left while waiting, the prefill chunks (each of a
    different request, in arrival order; at most one without `pack`), and a decoding step of
    `scheduler.running` (after the cancelled running requests leave)."""

    cancelled: list[Request] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)


class Scheduler:
    def __init__(self, rows: RowAllocator, max_batch: int, prefill_chunk: int,
                 prefill_budget: int | None = None, pack: bool = False) -> None:
        self.rows = rows
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = min(prefill_budget or prefill_chunk, prefill_chunk)
        self.pack = pack
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # in arrival order

    @property
    def running(self) -> list[Request]:
        """The running requests, running[i] in cache row i (the row allocator's list)."""
        return self.rows.running  # type: ignore[return-value]

    def add(self, r: Request) -> None:
        self.waiting.append(r)

    def busy(self) -> bool:
        """Whether a request is prefilling or running (jobs wait for an idle engine)."""
        return bool(self.prefilling) or bool(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.busy()

    def schedule(self, start: bool = True) -> StepPlan:
        """This step's plan; `start`: whether a waiting request may start (not while a job
        waits for an idle engine)."""
        plan = StepPlan()
        for r in [r for r in self.waiting if r.cancelled.is_set()]:
            self.waiting.remove(r)
            r.status = Status.FINISHED
            plan.cancelled.append(r)
        left = self.prefill_budget if self.running else self.prefill_chunk
        if self.pack and self.running:  # the decoding tokens share the pass, and its budget
            left = max(1, left - len(self.running))
        for r in self.prefilling:
            if left == 0 or (plan.prefills and not self.pack):
                break
            left -= self._chunk(plan, r, left)
        while (start and self.waiting and left > 0 and (self.pack or not self.prefilling)
               and len(self.running) + len(self.prefilling) < self.max_batch):
            r = self.waiting.popleft()
            r.status = Status.PREFILLING
            if not r.whole_prompt:
                r.reuse = self.rows.lookup(r.prompt)
                r.prefilled = r.reuse[1]
            self.prefilling.append(r)
            left -= self._chunk(plan, r, left)
        return plan

    @staticmethod
    def _chunk(plan: StepPlan, r: Request, most: int) -> int:
        """Plans r's next chunk of at most `most` tokens; returns its size."""
        end = min(r.prefilled + most, len(r.prompt))
        plan.prefills.append(PrefillChunk(r, r.prefilled, end))
        return end - r.prefilled

    def prefilled(self, chunk: PrefillChunk) -> None:
        chunk.request.prefilled = chunk.end
        if chunk.last:
            chunk.request.kv_len = chunk.request.length  # every prompt position is written

    def stepped(self) -> None:
        """A decoding step ran: every running request's keys/values are written up to its
        length (before its new token is taken)."""
        for r in self.running:
            r.kv_len = r.length

    def abandon(self, r: Request) -> None:
        """r failed or ended on the way in (prefilling, or being admitted): out of its row."""
        if r in self.prefilling:
            self.end_prefill(r, admit=False)
        elif r in self.running:  # failed while being admitted: it was added last
            self.rows.unadmit(r)
            r.status = Status.FINISHED

    def end_prefill(self, r: Request, admit: bool) -> tuple[int, list[Move]]:
        """r's prefill is over: it gets a row (`admit`: its row and the moves that clear it)
        or it finished (first token a stop, max_tokens 1, cancelled, failed): (-1, [])."""
        self.prefilling.remove(r)
        if not admit:
            r.status = Status.FINISHED
            return -1, []
        r.status = Status.RUNNING
        return self.rows.admit(r)

    def release_cancelled(self) -> tuple[list[Request], list[Move]]:
        """Takes the cancelled running requests out of their rows (before a decoding step)."""
        gone, moves = [], []
        for i in reversed(range(len(self.running))):
            if self.running[i].cancelled.is_set():
                gone.append(self.running[i])
                moves += self.finished(i)
        return gone, moves

    def finished(self, i: int) -> list[Move]:
        """Row i's request is done; returns the row moves that keeps the rows contiguous."""
        self.running[i].status = Status.FINISHED
        return self.rows.release(i)

    def fail_running(self) -> list[Request]:
        """Every running request out at once (a decoding step failed); returns them."""
        failed = list(self.running)
        for r in failed:
            r.status = Status.FINISHED
        self.rows.clear_running()
        return failed

    def drain(self) -> list[Request]:
        """Everything not finished (closing): waiting, prefilling and running."""
        out = self.fail_running() + list(self.waiting) + self.prefilling
        self.waiting.clear()
        self.prefilling = []
        for r in out:
            r.status = Status.FINISHED
        return out
