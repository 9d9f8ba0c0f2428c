"""Generation with an eviction method: prefill (one forward or chunks), optional suffix, decode steps; greedy, or
sampled per request (`Request.sampling`: temperature, top-k, top-p and a seed, evalkv/kv/sampling.py).

Prefill asks the model for the last position's logits only; every forward passes the tokens' true positions, so
RoPE positions never shift after eviction (docs/methods.md#shared-positions).

Batched decoding: `generate_batch` prefills each prompt alone (prompts differ in length), then decodes together the
samples whose compressed caches have the same shape and whose method keeps no per-sample state for decoding
(`Session.batch_key`); rows of a method with a slot cache (evalkv/kv/slots.py) whose prompts are shorter than its
budget batch whatever their lengths, padded with free slots (`Engine._slot_fill`), rows of the full cache batch
padded to a common length (`Engine._append_fill`) when they decode over fixed-size buffers and the device has room
for them side by side (`Engine._may_hold`), and rows of a scorer that cuts every few steps batch padded to the
longest row, each cut reading every row over its own entries (`Engine._hook_fill`, `Method.decodes_padded`).
Each row keeps its own true
positions; a row leaves the batch when it stops. The tokens equal batch-size-1 decoding up to floating-point
reassociation of the batched matmuls (identical in fp32 on the CPU in the tests). A sampling row draws from its own
generator once per step, so that holds for sampled tokens too.

CUDA graphs (`decode_graphs="auto"`, on CUDA devices): a group whose cache only grows while decoding decodes through a
`StaticDecoder`, whose step is captured once and replayed (evalkv/kv/graphs.py). The captured graph is kept for the
next group of the same shape when the method holds a budget (its cache size does not depend on the prompt).
`decode_graphs="compile"` compiles that step with torch.compile before capturing it (on the CPU: runs it compiled).
A method whose step hook acts only every few steps (`Method.segment_steps`: a scorer cutting every `decode_interval`
steps) decodes in segments: the steps up to its next cut replay a `SegmentDecoder`'s graph, which also keeps their
queries, then its hook runs once over them on the session's cache (`Engine._decode_segments`).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from evalkv.errors import EvalkvError
from evalkv.kv import adapter
from evalkv.kv.graphs import SegmentDecoder, StaticDecoder, can_decode_static, dense_on, may_compile
from evalkv.kv.quant import Kivi
from evalkv.kv.sampling import Sampling, sample_token
from evalkv.kv.session import Session
from evalkv.kv.slots import SlotDecoder, implements_slots
from evalkv.kv.view import Phase

# auto: CUDA graphs for decode steps on CUDA devices where the method allows; off: never; eager: the graphs' fixed-size
# buffers without capturing (what a replay computes, runnable on the CPU: tests and debugging); compile: auto's graph of
# a torch.compile'd step (fused kernels; compiled once per buffer shape), on the CPU the compiled step without a graph.
DECODE_GRAPHS = ("auto", "off", "eager", "compile")
# Capturing costs about two eager steps, so shorter generations decode eagerly; buffers are sized in steps of this
# many tokens so that batches with slightly different lengths reuse one graph.
_GRAPH_MIN_STEPS = 8
_GRAPH_STEP_QUANTUM = 32
# Full-cache rows of nearby lengths decode together: lengths are rounded up to a multiple of this many entries, or of
# the steps to come when there are more (`Engine._append_fill`).
_APPEND_FILL_QUANTUM = 256


def _round_up(value: int, quantum: int) -> int:
    return -(-value // quantum) * quantum


def _capacity_fill(session: Session) -> int | None:
    """The method's capacity, to which rows of shorter prompts may be padded, when every layer of `session` is dense,
    unpadded, full width and holds at most that many entries; else None."""
    capacity = session.method.capacity(session.sample.prompt_length)
    if any(layer.is_ragged or layer.padded or layer.pruned is not None or layer.length > capacity
           for layer in session.cache.layers):
        return None
    return capacity


def check_decode_graphs(mode: str) -> None:
    """Refuse an unknown decode_graphs mode, naming the known ones (callers check before loading a model)."""
    if mode not in DECODE_GRAPHS:
        raise EvalkvError(f"unknown decode_graphs {mode!r}; known: {', '.join(DECODE_GRAPHS)}")


@dataclass
class Request:
    """One prompt to complete: greedily, or sampled with its own seeded generator (`sampling`)."""

    prompt_ids: Sequence[int] | Tensor
    max_new_tokens: int
    stop_token_ids: Sequence[int] = ()
    suffix_ids: Sequence[int] | Tensor | None = None  # fed after the prompt was compressed (no eviction)
    min_new_tokens: int = 0  # stop tokens are masked out of the first choices (HF generate's `min_length`)
    sampling: Sampling | None = None  # None: greedy

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, a final stop token included
    prompt_tokens: int  # prompt + suffix tokens fed before decoding
    kept_tokens: float  # mean entries per layer and KV head once the prompt was processed
    kv_bytes: int  # bytes of keys and values held at that moment (quantised: codes, scales, zero points, residuals)
    final_kept_tokens: float  # the same after the last decode step
    final_kv_bytes: int
    prefill_s: float  # prompt (and suffix) forwards, eviction included, up to the first token
    decode_s: float  # decode steps until this sample stopped (shared wall time when decoded in a batch)
    decode_batch: int = 1  # samples decoding together when this one started decoding
    decode_graph: bool = False  # its decode steps replayed a captured CUDA graph
    decode_compiled: bool = False  # its decode steps ran a torch.compile'd step (decode_graphs="compile")
    decode_static: bool = False  # its decode steps ran over fixed-size buffers (`StaticDecoder` and its kinds)
    context_reused: bool = False  # its prompt's compression was reused (several questions about one context)
    trace: list | None = None  # Session.trace when asked for
    forwards: list | None = None  # with trace: (input ids, positions, last logits) of every forward
    session: Session | None = None  # kept when asked for (tests inspect the cache)


@dataclass
class _Row:
    """A sample between prefill and the end of its decoding."""

    request: Request
    session: Session | None  # released once the row is done (batched runs), so caches do not pile up
    length: int  # tokens fed before decoding (prompt + suffix)
    prefill_s: float
    kept_tokens: float
    kv_bytes: int
    forwards: list | None
    tokens: list[int] = field(default_factory=list)
    stops: set[int] = field(default_factory=set)
    decode_s: float = 0.0
    final_kept_tokens: float = 0.0
    final_kv_bytes: int = 0
    decode_graph: bool = False
    decode_compiled: bool = False
    decode_static: bool = False
    context_reused: bool = False
    on_finished: Callable[[], None] | None = None  # told once, when the row's generation ends
    generator: torch.Generator | None = None  # the request's own draws when it samples

    def done(self) -> None:
        if self.on_finished is not None:
            self.on_finished()

    def finished(self) -> bool:
        return len(self.tokens) >= self.request.max_new_tokens or self.tokens[-1] in self.stops

    @property
    def steps_left(self) -> int:
        """Decode steps this row may still take (its token limit less the tokens it has)."""
        return self.request.max_new_tokens - len(self.tokens)

    def generation(self, decode_batch: int, keep_session: bool) -> Generation:
        return Generation(
            token_ids=self.tokens, prompt_tokens=self.length, kept_tokens=self.kept_tokens, kv_bytes=self.kv_bytes,
            final_kept_tokens=self.final_kept_tokens, final_kv_bytes=self.final_kv_bytes, prefill_s=self.prefill_s,
            decode_s=self.decode_s, decode_batch=decode_batch, decode_graph=self.decode_graph,
            decode_compiled=self.decode_compiled, decode_static=self.decode_static, context_reused=self.context_reused,
            trace=self.session.trace if self.session else None,
            forwards=self.forwards, session=self.session if keep_session else None,
        )


def _positions(start: int, count: int, device: torch.device) -> Tensor:
    return torch.arange(start, start + count, device=device)[None, :]


class _SharedContexts:
    """The compressed prompts that later requests of one `generate_batch` share, each kept until its last use.

    Requests with a suffix and the same prompt ids (by sha256) share the prompt's compression; a prompt no other
    request shares is never copied."""

    def __init__(self, requests: Sequence[Request]):
        self.uses: dict[str, int] = {}
        for request in requests:
            key = self._key(request)
            if key is not None:
                self.uses[key] = self.uses.get(key, 0) + 1
        self.sessions: dict[str, Session] = {}

    @staticmethod
    def _key(request: Request) -> str | None:
        if request.suffix_ids is None or len(request.suffix_ids) == 0:
            return None
        ids = torch.as_tensor(request.prompt_ids, dtype=torch.long).cpu()
        return hashlib.sha256(ids.numpy().tobytes()).hexdigest()

    def take(self, request: Request) -> Session | None:
        """A copy of the compressed prompt of an earlier request, or None (this request compresses it)."""
        key = self._key(request)
        if key not in self.sessions:
            return None
        self.uses[key] -= 1
        return self.sessions.pop(key) if self.uses[key] == 0 else self.sessions[key].fork()

    def keep(self, request: Request, session: Session) -> None:
        """After compressing a request's prompt (before its suffix): keep a copy if later requests share it."""
        key = self._key(request)
        if key is not None:
            self.uses[key] -= 1
            if self.uses[key] > 0:
                self.sessions[key] = session.fork()


class PromptReplay:
    """What `Method.rescore_prompt` receives: runs the model over extra tokens against the prompt's cache.

    `run(ids, score)` feeds `ids` after the prompt (true positions from the prompt's end), calls `score(view)` on each
    layer's view after its attention (phase REPLAY: no method hook runs, nothing is traced, no counter moves) and
    drops the fed entries again; it returns the scores, one per layer. The replayed forwards count in the sample's
    `prefill_s`; `tokens` counts what was fed."""

    def __init__(self, engine: Engine, session: Session, prompt: Tensor):
        self.engine, self.session, self.prompt_ids = engine, session, prompt
        self.geometry = session.geometry
        self.tokens = 0

    def run(self, ids: Tensor, score) -> list:
        ids = ids.to(self.engine.device).reshape(1, -1)
        start = self.prompt_ids.shape[-1]
        self.session.replay_score = score
        try:
            self.engine._forward(self.session, adapter.make_cache(self.session), ids,
                                 _positions(start, ids.shape[-1], self.engine.device), Phase.REPLAY, None)
        finally:
            self.session.replay_score = None
        self.tokens += ids.shape[-1]
        return self.session.replay_scores


class Engine:
    """Runs one model with one method: `generate` for one prompt, `generate_batch` for several."""

    def __init__(self, model, method, backend: str = "sdpa", tokenizer=None, mlp_chunk: int | None = None,
                 decode_graphs: str = "auto", quantization: Kivi | None = None):
        """method: an eviction method (`evalkv.methods`: its hooks, `capacity`, `prefill_chunk`, `prepare`).
        mlp_chunk: run the MLP over at most this many prompt tokens at a time (low-memory long prefill).
        decode_graphs: "auto" replays decode steps as CUDA graphs where it can, "off" never, "compile" replays graphs of
            a compiled step (see DECODE_GRAPHS).
        quantization: hold what the method keeps as KIVI codes (evalkv/kv/quant.py); such samples decode eagerly."""
        check_decode_graphs(decode_graphs)
        if quantization is not None:
            quantization.check(method, adapter.geometry(model).head_dim)
        adapter.install(model)
        adapter.chunk_mlp(model, mlp_chunk)
        method.prepare(tokenizer)
        self.model = model
        self.method = method
        self.backend = backend
        self.geometry = adapter.geometry(model)
        self.rotary = adapter.rotary(model)
        self.output_projections = adapter.output_projections(model)
        self.device = next(model.parameters()).device
        self.decode_graphs = decode_graphs
        self.quantization = quantization
        self._static: tuple[tuple, StaticDecoder] | None = None  # the last decoder, kept for the next batch

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Sequence[int] | Tensor,
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
        suffix_ids: Sequence[int] | Tensor | None = None,
        trace: bool = False,
        keep_session: bool = False,
        min_new_tokens: int = 0,
        sampling: Sampling | None = None,
    ) -> Generation:
        """Greedy tokens after `prompt_ids` (compressed by the method) and `suffix_ids` (fed after compression), or
        sampled ones with `sampling` (evalkv/kv/sampling.py).

        Generation stops after a stop token or `max_new_tokens`; stop tokens are masked out of the first
        `min_new_tokens` choices (HF generate's `min_length`, which LongBench uses on samsum).
        """
        request = Request(prompt_ids, max_new_tokens, stop_token_ids, suffix_ids, min_new_tokens, sampling)
        row = self._prefill(request, trace)
        if row.finished():
            self._finish(row, row.session)
        else:
            self._decode([row], row.session, keep_entries=keep_session)  # finishes the row when it stops
        return row.generation(1, keep_session)

    @torch.inference_mode()
    def generate_batch(self, requests: Sequence[Request], max_batch: int | None = None,
                       on_finished: Callable[[int], None] | None = None) -> list[Generation]:
        """`generate` for each request, in order; samples whose caches allow it decode together (at most
        `max_batch` at once, default all). Requests with a suffix whose prompts are equal share one compression of
        the prompt (each continues from its own copy: `Generation.context_reused`). `on_finished(index)` is called
        as each request's generation ends (progress per sample while a batch decodes)."""
        rows: list[_Row] = []
        sizes = [1] * len(requests)
        groups: dict[tuple, list[int]] = {}
        waiting = 0  # bytes the decode buffers of the full caches held for a batch will take (`_buffer_bytes`)
        contexts = _SharedContexts(requests)
        for index, request in enumerate(requests):
            row = self._prefill(request, contexts=contexts)
            row.on_finished = None if on_finished is None else functools.partial(on_finished, index)
            rows.append(row)
            if row.finished():
                self._finish(row, row.session)
                row.session = None
                continue
            fill = self._fill(row)
            key = row.session.batch_key(fill)
            need = self._buffer_bytes(row, fill)
            if key is not None and not self._may_hold(need, waiting):
                key = None
            if key is None:  # decoded at once and released
                self._decode([row], row.session)
                row.session = None
            else:
                groups.setdefault((key, fill), []).append(index)
                waiting += need
        limit = max_batch or len(rows)
        for (_, fill), members in groups.items():
            for start in range(0, len(members), limit):
                batch = [rows[i] for i in members[start : start + limit]]
                session = (batch[0].session if len(batch) == 1
                           else Session.merge([row.session for row in batch], fill_to=fill))
                for row in batch:  # the merged cache holds the entries now; the per-sample copies go
                    row.session = None
                self._decode(batch, session)
                for i in members[start : start + limit]:
                    sizes[i] = len(batch)
        return [row.generation(sizes[i], keep_session=False) for i, row in enumerate(rows)]

    def _forward(self, session: Session, cache, ids: Tensor, positions: Tensor, phase: Phase,
                 forwards: list | None, last_chunk: bool = True) -> Tensor:
        session.begin_forward(phase, positions, last_chunk)
        logits = adapter.forward(self.model, ids, positions, cache)
        if forwards is not None:
            forwards.append((ids, positions, logits.float().clone()))
        return logits

    def _prefill(self, request: Request, trace: bool = False, contexts: _SharedContexts | None = None) -> _Row:
        """The prompt's forwards (compressed by the method), then the suffix's, up to the first generated token.

        contexts: prompts that several requests with a suffix share (several questions about one context) are
        compressed once; each request continues from its own copy, and `prefill_s` of all but the first counts the
        suffix alone (`context_reused`)."""
        prompt = torch.as_tensor(request.prompt_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        suffix = None
        if request.suffix_ids is not None and len(request.suffix_ids) > 0:
            suffix = torch.as_tensor(request.suffix_ids, dtype=torch.long, device=self.device).reshape(1, -1)
        forwards = [] if trace else None
        adapter.synchronize(self.device)
        began = time.perf_counter()
        session = contexts.take(request) if contexts is not None and not trace else None
        reused = session is not None
        if session is None:
            session = Session(self.method, self.geometry, prompt, backend=self.backend, trace=trace,
                              rotary=self.rotary, output_projections=self.output_projections,
                              quantization=self.quantization)
            logits = self._compress(session, prompt, forwards)
            if getattr(self.method, "rescore_prompt", None) is not None:
                keeps = self.method.rescore_prompt(PromptReplay(self, session, prompt))
                for layer_idx, keep in enumerate(keeps):
                    if keep is not None:
                        session.apply(layer_idx, keep)
            if contexts is not None and not trace:
                contexts.keep(request, session)
        length = prompt.shape[-1]
        if suffix is not None:
            logits = self._forward(session, adapter.make_cache(session), suffix, _positions(length, suffix.shape[-1],
                                   self.device), Phase.SUFFIX, forwards)
            length += suffix.shape[-1]
        row = _Row(request, session, length, 0.0, 0.0, 0, forwards, stops=set(map(int, request.stop_token_ids)),
                   context_reused=reused,
                   generator=None if request.sampling is None else request.sampling.generator(self.device))
        row.tokens.append(int(self._choose(logits, [row])[0]))
        adapter.synchronize(self.device)
        row.prefill_s = time.perf_counter() - began
        row.kept_tokens, row.kv_bytes = session.cache.kept_tokens(), session.cache.nbytes
        return row

    def _compress(self, session: Session, prompt: Tensor, forwards: list | None) -> Tensor:
        """Feed the prompt (in `prefill_chunk` pieces when the method asks); returns the last position's logits."""
        cache = adapter.make_cache(session)
        length = prompt.shape[-1]
        chunk = self.method.prefill_chunk or length
        for start in range(0, length, chunk):
            end = min(length, start + chunk)
            logits = self._forward(session, cache, prompt[:, start:end], _positions(start, end - start, self.device),
                                   Phase.PREFILL, forwards, last_chunk=end == length)
        return logits

    def _choose(self, logits: Tensor, rows: list[_Row]) -> list[int]:
        """Greedy choice per row, or one draw from the row's own generator when its request samples (so a row's
        tokens do not depend on the rows beside it); a row still under its `min_new_tokens` cannot choose a stop
        token."""
        for index, row in enumerate(rows):
            if row.stops and len(row.tokens) < row.request.min_new_tokens:
                masked = torch.tensor(sorted(row.stops), dtype=torch.long, device=logits.device)
                logits[index].index_fill_(-1, masked, float("-inf"))
        choices = logits.argmax(dim=-1)
        for index, row in enumerate(rows):
            if row.generator is not None:
                choices[index] = sample_token(logits[index], row.request.sampling, row.generator)[0]
        return choices.tolist()

    def _decode(self, rows: list[_Row], session: Session, keep_entries: bool = False) -> None:
        """Decode `rows` (held as batch rows of `session`, in order) until each stops.

        keep_entries: leave the final entries in `session` (a `StaticDecoder` takes them out while it decodes, and
        puts them back only when asked: one row)."""
        steps = max(row.steps_left for row in rows)
        session.pad_ragged()
        if self._static_allowed(rows, session, steps):
            self._decode_static(rows, session, steps, keep_entries)
            return
        if self._segments_allowed(rows, session, steps):
            self._decode_segments(rows, session)
            return
        if session.needs_slots():
            raise RuntimeError(f"{session.method.name}: rows merged padded with free slots (prompts shorter than the "
                               "budget) reached eager decoding, whose step hooks would read the padding as entries; "
                               "only the slot cache decodes them (Engine._slot_fill should not have let them merge)")
        cache = adapter.make_cache(session)
        active = list(rows)
        adapter.synchronize(self.device)
        began = time.perf_counter()
        while active:
            ids = torch.tensor([[row.tokens[-1]] for row in active], device=self.device)
            positions = torch.tensor([[row.length + len(row.tokens) - 1] for row in active], device=self.device)
            logits = self._forward(session, cache, ids, positions, Phase.DECODE,
                                   active[0].forwards if len(active) == 1 else None)
            for row, token in zip(active, self._choose(logits, active)):
                row.tokens.append(token)
            staying = [index for index, row in enumerate(active) if not row.finished()]
            if len(staying) < len(active):
                adapter.synchronize(self.device)
                elapsed = time.perf_counter() - began
                for index, row in enumerate(active):
                    if index not in staying:
                        row.decode_s = elapsed
                        self._finish(row, session, index)
                if staying:
                    session.keep_rows(staying)
                active = [active[index] for index in staying]

    def _static_allowed(self, rows: list[_Row], session: Session, steps: int) -> bool:
        # The fixed-size buffers hold exact entries: a quantised cache decodes on the eager path.
        if not self._buffers_allowed(rows[0], session, steps):
            return False
        return can_decode_static(session, self.device) or self._slots_allowed(rows, session)

    def _buffers_allowed(self, row: _Row, session: Session, steps: int) -> bool:
        """Whether `steps` decode steps of `session` may run over fixed-size buffers at all: no trace (`row`'s
        forwards), no quantised cache, and decode_graphs letting them: "eager" and "compile" anywhere, "auto" where
        it captures; capturing only for generations long enough to repay the capture."""
        if row.forwards is not None or session.quantization is not None or self.decode_graphs == "off":
            return False
        if self.decode_graphs == "auto" and not self._captures():
            return False
        return not (self._captures() and steps < _GRAPH_MIN_STEPS)

    def _segments_allowed(self, rows: list[_Row], session: Session, steps: int) -> bool:
        """Whether the batch decodes in segments over fixed-size buffers (`_decode_segments`): a method whose step hook
        can catch up on several forwards at once (`Method.segment_steps`), fixed-size buffers allowed, dense layers
        on the model's device (padded ones too) with no per-entry method state and full-width keys."""
        if session.method.segment_steps(session.sample) is None or not self._buffers_allowed(rows[0], session, steps):
            return False
        return dense_on(session, self.device, in_slots=True) and all(
            not layer.extras and layer.pruned is None for layer in session.cache.layers)

    def _decode_segments(self, rows: list[_Row], session: Session) -> None:
        """`_decode` for a method whose step hook acts every few steps (`Method.segment_steps`): the forwards up to its
        next action run over fixed-size buffers (`SegmentDecoder`, replayed as a CUDA graph where `_captures`), then
        the entries return to the session and its hook runs once over those forwards' queries
        (`Session.after_forwards`: a scorer's cut); repeated until the last row stops. Every row steps until then, as
        in `_decode_static`; a row's record is taken when it stops (after the hook, when it stops at a segment's
        end)."""
        layers = session.cache.layers
        active = list(range(len(rows)))
        adapter.synchronize(self.device)
        began = time.perf_counter()
        while active:
            left = max(rows[index].steps_left for index in active)
            steps = min(session.method.segment_steps(session.sample), left)
            kept = session.method.segment_queries()
            key = (SegmentDecoder.shape_key(layers, steps, kept), self._captures() and steps >= _GRAPH_MIN_STEPS)
            if self._static is not None and self._static[0] == key:
                decoder = self._static[1]
            else:
                self._static = decoder = None  # the previous buffers and graph go before the new ones are allocated
                decoder = SegmentDecoder(self.model, self.geometry, layers, steps, graph=key[1],
                                         compiled=key[1] and self._compiles(session, key), kept_queries=kept)
            decoder.load(layers, release=True)
            positions = []
            ended: list[int] = []
            for taken in range(1, steps + 1):
                positions.append([row.length + len(row.tokens) - 1 for row in rows])
                finished = self._buffer_step(decoder, rows, active, began)
                for index in finished:
                    if taken < steps:  # the hook acts after the segment's last forward only
                        row = rows[index]
                        row.final_kept_tokens, row.final_kv_bytes = decoder.held(taken, index)
                        row.done()
                    else:
                        ended.append(index)
                active = [index for index in active if index not in finished]
            decoder.unload(layers, steps)
            fed = torch.tensor(positions[-decoder.ring :], device=self.device).T  # the kept queries' positions
            session.after_forwards(decoder.queries(steps), fed, decoder.scalings, steps)
            for index in ended:
                self._finish(rows[index], session, index)
            self._static = (key, decoder)

    def _slots_allowed(self, rows: list[_Row], session: Session) -> bool:
        """Whether the batch decodes through `SlotDecoder`: a method that evicts through `evict_slot`, dense and
        stateless layers (padded ones too: rows merged with `_slot_fill`), and every row's capacity the same (rows
        of one batch share `decode_group_key`)."""
        return implements_slots(session.method) and dense_on(session, self.device, in_slots=True)

    def _fill(self, row: _Row) -> int | None:
        """The length `row`'s layers may be padded to so that it decodes in one batch with rows of other prompt
        lengths: a slot cache's capacity (`_slot_fill`), a full cache's common length (`_append_fill`), or the
        capacity of a method whose step hooks read padded batches row by row (`_hook_fill`); None: it batches only
        with rows of its own shapes."""
        for fill in (self._slot_fill(row), self._append_fill(row), self._hook_fill(row)):
            if fill is not None:
                return fill
        return None

    def _append_fill(self, row: _Row) -> int | None:
        """For a method without a budget whose decode steps only append (the full cache): the row's length rounded up
        to a multiple of `_APPEND_FILL_QUANTUM` entries or of its steps to come (rounded up to that), whichever is
        larger, when its steps run over fixed-size buffers (`StaticDecoder`, which masks the padding by position) and
        its layers are dense, full width and of one length. Rows of one value decode together, padded to the longest
        of them: a row reads fewer padding entries a step than the larger quantum, so for long generations (a
        reasoning workload's thousands of steps after prompts of hundreds of tokens) the rows of different prompt
        lengths make one batch. Eager decoding never meets such padding: a batch decodes the most steps of its rows,
        so every row's check holds for the batch."""
        session = row.session
        steps = row.steps_left
        if (session.method.requires_budget() or not self._buffers_allowed(row, session, steps)
                or not can_decode_static(session, self.device)):
            return None
        layers = session.cache.layers
        if any(layer.padded or layer.is_ragged or layer.length != layers[0].length for layer in layers):
            return None
        return _round_up(layers[0].length, _round_up(max(steps, 1), _APPEND_FILL_QUANTUM))

    @staticmethod
    def _hook_fill(row: _Row) -> int | None:
        """For a method with step hooks that reads a padded batch row by row (`Method.decodes_padded`: a scorer that
        cuts every few steps): its capacity, when the row's layers are dense, full width and hold at most that, so that
        rows of prompts shorter than the budget decode in one batch (their layers padded at the end to the longest
        row, `Session.merge`; eagerly, or in segments between the cuts, `_decode_segments`). No trace, no quantised
        cache."""
        session = row.session
        method = session.method
        if (not method.acts_while_decoding or not method.decodes_padded() or row.forwards is not None
                or session.quantization is not None):
            return None
        return _capacity_fill(session)

    @staticmethod
    def _buffer_bytes(row: _Row, fill: int | None) -> int:
        """The bytes `row` takes in a full cache's decode buffers: its padded length and its steps, at the bytes per
        entry its cache holds now (0 for a budgeted method, whose rows are small)."""
        session = row.session
        if session.method.requires_budget() or fill is None:
            return 0
        steps = _round_up(row.steps_left, _GRAPH_STEP_QUANTUM)
        length = max(1, session.cache.layers[0].length)
        return session.cache.nbytes * (fill + steps) // length

    def _may_hold(self, need: int, waiting: int) -> bool:
        """Whether a row whose decode buffers take `need` bytes (`_buffer_bytes`: 0 for a budgeted cache, which always
        may) may wait for its batch: while the buffers of the held rows (`waiting` bytes) and its own fit in the memory
        the device has left, so that batching never runs out of memory where decoding each row alone would not (the
        prompt caches are held already, and each is released as the buffers take it). Off CUDA: always."""
        if not need or self.device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        reusable = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return waiting + need <= free + reusable

    def _slot_fill(self, row: _Row) -> int | None:
        """The capacity to which `row`'s layers may be filled with free slots, so that it decodes in one batch with
        rows of other prompt lengths (prompts shorter than the budget); None: it batches only with rows of its own
        shapes. Such rows decode only through a `SlotDecoder` (`Session.needs_slots`), so this asks for everything
        that path needs: a method with `evict_slot`, the fixed-size buffers allowed for the row's own steps (a batch
        decodes the most steps of its rows), no trace, no quantisation, and dense layers on the model's device, full
        width, each holding at most the capacity."""
        session = row.session
        steps = row.steps_left
        if (not self._buffers_allowed(row, session, steps) or not implements_slots(session.method)
                or not dense_on(session, self.device)):
            return None
        return _capacity_fill(session)

    def _decode_static(self, rows: list[_Row], session: Session, steps: int, keep_entries: bool) -> None:
        """`_decode` over fixed-size buffers: every row stays in the batch until the last one stops (a finished row's
        steps are wasted, which costs little: a decode step's time is the weights' reading)."""
        layers = session.cache.layers
        slots = not can_decode_static(session, self.device)
        if slots:
            capacity = session.method.capacity(session.sample.prompt_length)
            key = SlotDecoder.shape_key(layers, capacity)
        else:
            steps = _round_up(steps, _GRAPH_STEP_QUANTUM)
            key = StaticDecoder.shape_key(layers, steps)
        if self._static is not None and self._static[0] == key:
            decoder = self._static[1]
        else:
            self._static = None  # the previous buffers and graph go before the new ones are allocated
            if slots:
                decoder = SlotDecoder(self.model, self.geometry, layers, session.method, capacity,
                                      graph=self._captures(), compiled=self._compiles(session, key))
            else:
                decoder = StaticDecoder(self.model, self.geometry, layers, steps, graph=self._captures(),
                                        compiled=self._compiles(session, key))
        decoder.load(layers, release=True)
        active = list(range(len(rows)))
        adapter.synchronize(self.device)
        began = time.perf_counter()
        while active:
            finished = self._buffer_step(decoder, rows, active, began)
            for index in finished:
                row = rows[index]
                row.final_kept_tokens, row.final_kv_bytes = decoder.held(len(row.tokens) - 1, index)
                row.done()
            active = [index for index in active if index not in finished]
        if keep_entries:
            decoder.unload(layers, len(rows[0].tokens) - 1)
        if session.method.requires_budget():
            self._static = (key, decoder)

    def _buffer_step(self, decoder: StaticDecoder, rows: list[_Row], active: list[int], began: float) -> list[int]:
        """One step of `decoder` for every row (finished rows still step; only the `active` ones choose, and draw);
        returns the rows that stopped, their decode time and path recorded (their memory figures are the caller's)."""
        logits = decoder.step([row.tokens[-1] for row in rows], [row.length + len(row.tokens) - 1 for row in rows])
        if len(active) < len(rows):
            logits = logits[active]
        for index, choice in zip(active, self._choose(logits, [rows[index] for index in active])):
            rows[index].tokens.append(choice)
        finished = [index for index in active if rows[index].finished()]
        if finished:
            adapter.synchronize(self.device)
            elapsed = time.perf_counter() - began
            for index in finished:
                row = rows[index]
                row.decode_s, row.decode_static = elapsed, True
                row.decode_graph, row.decode_compiled = decoder.graph is not None, decoder.compiled
        return finished

    def _compiles(self, session: Session, key: tuple) -> bool:
        """Whether a new decoder compiles its step: with decode_graphs="compile", for methods with a budget (their
        batches share a few shapes, so a compile is reused; a full cache's shape changes with every prompt and would
        compile for every sample), within dynamo's limit of compiled shapes per process."""
        return (self.decode_graphs == "compile" and session.method.requires_budget()
                and may_compile(self.model, key))

    def _captures(self) -> bool:
        """Whether static decoding captures CUDA graphs: "auto" and "compile" on a CUDA device."""
        return self.decode_graphs in ("auto", "compile") and self.device.type == "cuda"

    @staticmethod
    def _finish(row: _Row, session: Session, index: int = 0) -> None:
        """Record what batch row `index` of `session` holds as `row` ends."""
        row.final_kept_tokens = session.cache.kept_tokens(index)
        row.final_kv_bytes = session.cache.nbytes_of(index)
        row.done()
