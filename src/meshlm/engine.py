"""The inference engine: prefill, insert, generate over a fixed set of decode slots.

    prefill  prompts (right-padded to a length bucket) -> a prefill KV cache and each prompt's first token
    insert   one prefilled sequence into a decode slot of the engine's preallocated KV cache
    generate `steps_per_dispatch` decode steps for every slot -> the next tokens of each

Each step is jitted once per shape bucket, samples inside the jitted function and donates the KV
cache, so the only device->host traffic per token is the sampled ids. A dispatch runs several
steps (as vLLM's multi-step scheduling): launching a jitted step costs the host ~1-1.5 ms of CPU
(per argument work over some 370 weight buffers), and on a 2-core host that time is taken from
the step's own kernel threads (int8 batch-1 decode: 5.6 ms/token at 1 step per dispatch, 5.1 at
4, 4.9 at 16). New requests join between dispatches. The model is reached
through a small `Backend` (see `ReferenceBackend`; the sharded model provides one per layout),
so the same engine drives the unsharded oracle and every prefill/decode layout.

Text is handled on the host: `Detokenizer` turns ids into text deltas (never splitting a
multi-byte UTF-8 character) and applies stop strings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from meshlm import hugepages, reference
from meshlm.config import ModelConfig
from meshlm.errors import MeshlmError
from meshlm.sampling import SamplingParams, batch_arrays, sample

DEFAULT_STEPS_PER_DISPATCH = 8  # decode steps per jitted call; a new request waits at most this many


class Backend(Protocol):
    """What the engine needs from a model. `prefill`/`decode` are traced inside the engine's jit."""

    cfg: ModelConfig

    def init_cache(self, batch: int, max_len: int) -> Any: ...
    def prefill(self, params, tokens, lengths, cache) -> tuple[jax.Array, Any]:
        """tokens [B, L] right-padded, lengths [B] -> (logits [B, V] at each prompt's last token, cache)."""
    def decode(self, params, cache, tokens, positions) -> tuple[jax.Array, Any]:
        """tokens [B], positions [B] -> (logits [B, V], cache)."""
    def adopt_cache(self, cache, source: "Backend") -> Any:
        """A cache filled by `source` (the prefill backend) laid out for this backend."""


@dataclass
class ReferenceBackend:
    """The unsharded reference model on one device."""

    cfg: ModelConfig
    dtype: Any = jnp.float32

    def init_cache(self, batch, max_len):
        return reference.init_cache(self.cfg, batch, max_len, self.dtype)

    def prefill(self, params, tokens, lengths, cache):
        logits, cache = reference.prefill(params, self.cfg, tokens, lengths, cache)
        return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], cache

    def decode(self, params, cache, tokens, positions):
        return reference.decode(params, self.cfg, cache, tokens, positions)

    def adopt_cache(self, cache, source):
        return cache


def bucket(n: int, lo: int = 8) -> int:
    """Shape bucket: the next power of two >= n (at least lo), so few distinct shapes compile."""
    return max(lo, 1 << max(0, n - 1).bit_length())


@dataclass
class Prefilled:
    """A prefill result: its cache (batch = len(first_ids) rounded up) and per-prompt state."""

    cache: Any
    lengths: list[int]
    first_ids: list[int]


class Engine:
    """prefill / insert / generate over `slots` decode slots of `max_len` positions each."""

    def __init__(self, backend: Backend, params, *, slots: int = 4, max_len: int = 512,
                 prefill_backend: Backend | None = None, eos_ids: Sequence[int] = (),
                 steps_per_dispatch: int = DEFAULT_STEPS_PER_DISPATCH):
        if steps_per_dispatch < 1:
            raise MeshlmError(f"steps per dispatch must be at least 1, got {steps_per_dispatch}")
        self.backend, self.params = backend, params
        self.k = steps_per_dispatch
        self.prefill_backend = prefill_backend or backend  # prefill may run another layout
        self.cfg = backend.cfg
        # batch sizes each layout can split (sharded backends say; 1 for the reference): slots are
        # rounded up for decode, prefill batches for both (its cache is converted for decode)
        dec_m, pre_m = (getattr(b, "batch_multiple", 1) for b in (backend, self.prefill_backend))
        self.prefill_batch_multiple = math.lcm(dec_m, pre_m)
        self.slots, self.max_len = -(-slots // dec_m) * dec_m, min(max_len, self.cfg.max_seq_len)
        slots = self.slots
        self.eos_ids = tuple(eos_ids)
        self.cache = backend.init_cache(slots, self.max_len)  # preallocated once, donated every step
        hugepages.advise(self.cache)  # on CPU: a long context's cache streams on 2 MiB pages too
        self._prefill_jit = jax.jit(self._prefill_fn, donate_argnums=(3,))
        shardings = jax.tree.map(lambda a: a.sharding, self.cache)  # insert keeps decode's layout
        self._insert_jit = jax.jit(_insert_fn, donate_argnums=(0,), out_shardings=shardings)
        sh = jax.tree.leaves(self.cache)[0].sharding  # sampled ids come back replicated over the cache's devices
        self._ids_sharding = NamedSharding(sh.mesh, PartitionSpec()) if isinstance(sh, NamedSharding) else sh
        # outputs pinned like the inputs: a cache coming back in an equivalent but differently
        # written sharding (P() for P(None, None, 'zyx', None) on one device) compiled the step twice
        self._generate_jit = jax.jit(self._generate_fn, donate_argnums=(1,),
                                     out_shardings=(self._ids_sharding, shardings, self._ids_sharding,
                                                    self._ids_sharding))
        # host-side slot state
        self.tokens = np.zeros(slots, np.int32)  # last sampled token of each slot (the next input)
        self.positions = np.zeros(slots, np.int32)  # position that token takes
        self.sampling = [SamplingParams()] * slots
        self._sp = self._device_sampling()
        self._ahead = None  # the next dispatch's results, launched ahead by generate()
        self.stats = RunStats()

    # ---- jitted bodies -------------------------------------------------------------------------
    def _prefill_fn(self, params, tokens, lengths, cache, sp):
        last, cache = self.prefill_backend.prefill(params, tokens, lengths, cache)  # last [B, V]
        return sample(last, lengths, sp), cache

    def _generate_fn(self, params, cache, tokens, positions, sp):
        """k = steps_per_dispatch steps -> (ids [k, B], cache, the last ids, positions + k): the
        next dispatch's tokens and positions stay on the device, so one launched ahead (generate)
        passes no host array."""
        def step(carry, _):
            tokens, positions, cache = carry
            p = jnp.minimum(positions, self.max_len - 1)  # a finished slot keeps stepping at the end
            logits, cache = self.backend.decode(params, cache, tokens, p)
            ids = sample(logits, p + 1, sp)
            return (ids, positions + 1, cache), ids

        (last, positions, cache), ids = jax.lax.scan(step, (tokens, positions, cache), length=self.k)
        return ids, cache, last, positions

    # ---- the three phases ------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams]) -> Prefilled:
        """Run prompts (token id lists, any lengths) together; returns their cache and first tokens."""
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise MeshlmError("empty prompt: at least one token is needed")
        if max(lengths) >= self.max_len:
            raise MeshlmError(f"prompt of {max(lengths)} tokens does not fit the context of {self.max_len}")
        m = self.prefill_batch_multiple
        B, L = -(-bucket(len(prompts), 1) // m) * m, min(bucket(max(lengths)), self.max_len)
        tokens = np.zeros((B, L), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = p
        lens = np.array(lengths + [1] * (B - len(prompts)), np.int32)  # dummy rows: one pad token
        sp = batch_arrays(list(sampling) + [SamplingParams()] * (B - len(prompts)))
        cache = self.prefill_backend.init_cache(B, L)
        ids, cache = self._prefill_jit(self.params, tokens, lens, cache, sp)
        cache = self.backend.adopt_cache(cache, self.prefill_backend)
        self.stats.prefill_shape = (B, L)
        return Prefilled(cache, lengths, [int(i) for i in np.asarray(ids)[:len(prompts)]])

    def insert(self, pre: Prefilled, index: int, slot: int, sampling: SamplingParams) -> None:
        """Copy prefilled sequence `index` into decode slot `slot` (its first token becomes the next input)."""
        self._ahead = None  # the speculative step ran on the old slot state (see generate)
        self.cache = self._insert_jit(self.cache, pre.cache, jnp.int32(index), jnp.int32(slot))
        self.tokens[slot], self.positions[slot] = pre.first_ids[index], pre.lengths[index]
        self.sampling[slot] = sampling
        self._sp = self._device_sampling()

    def _device_sampling(self) -> dict:
        """The slots' sampling arrays, put on the devices once per change: passed as host arrays
        they were copied in on every step (a dispatch took 1.8 vs 1.2 ms of host time with all
        inputs already on the device; on 2 cores that time is taken from the running step)."""
        return jax.device_put(batch_arrays(self.sampling), self._ids_sharding)

    def generate(self, ahead: bool = True) -> np.ndarray:
        """k = steps_per_dispatch decode steps for all slots -> the sampled tokens, host array
        [k, slots] (row j: step j). Every slot steps k times; a caller ignores a slot's rows after
        its request ends (the slot's cache is overwritten by the next insert).

        With `ahead`, the next k steps are dispatched before these ids are read back (from the
        last ids on the device), so launching them overlaps this run instead of following it.
        insert() discards that speculative dispatch: a step is deterministic in (tokens,
        positions, sampling), so running it again writes the same cache rows and samples the same
        ids. Pass ahead=False when an insert is coming (it would be wasted work)."""
        ids, last, positions = self._ahead if self._ahead is not None else self._dispatch(self.tokens, self.positions)
        self._ahead = self._dispatch(last, positions) if ahead else None
        ids = np.asarray(ids)
        self.tokens = ids[-1].astype(np.int32)
        self.positions = self.positions + self.k
        return ids

    def row_positions(self, j: int) -> np.ndarray:
        """Each slot's position of the token in row j of the last generate()'s ids."""
        return self.positions - self.k + j + 1

    def sync(self) -> None:
        """Wait for the step dispatched ahead, if any (e.g. before timing something else)."""
        jax.block_until_ready(self.cache)

    def _dispatch(self, tokens, positions):
        """Launch k decode steps (asynchronously) -> (ids [k, B], last ids, next positions), left
        on the device. Host tokens and positions are put where the steps leave their outputs, so
        both kinds of input share one compiled function."""
        if isinstance(tokens, np.ndarray):
            tokens, positions = jax.device_put((tokens, positions), self._ids_sharding)
        ids, self.cache, last, positions = self._generate_jit(self.params, self.cache, tokens, positions, self._sp)
        return ids, last, positions

    # ---- a whole batch of requests ---------------------------------------------------------------
    def stream(self, prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams] | SamplingParams,
               accept: Callable[[int, int], bool] | None = None) -> Iterator[tuple[int, int]]:
        """Generate for every prompt, `slots` at a time, yielding (request, token id) as sampled.

        A request ends on EOS (not yielded), max_tokens, the context limit, or when
        accept(request, id) returns False (that token is still yielded). Timings and finish
        reasons of the run are in `self.stats`."""
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        stats = self.stats = RunStats()
        t0 = time.perf_counter()
        pending = list(range(len(prompts)))
        owner: dict[int, int] = {}  # slot -> request
        count = [0] * len(prompts)

        def verdict(req: int, tok: int, position: int) -> tuple[bool, bool]:
            """(yield this token?, does the request continue?)"""
            sp = sampling[req]
            if tok in self.eos_ids and not sp.ignore_eos:
                stats.finish[req] = "stop"
                return False, False
            count[req] += 1
            if accept is not None and accept(req, tok) is False:
                stats.finish[req] = "stop"
                return True, False
            if count[req] >= sp.max_tokens or position + 1 >= self.max_len:
                stats.finish[req] = "length"
                return True, False
            return True, True

        while pending or owner:
            free = [s for s in range(self.slots) if s not in owner]
            if pending and free:
                batch, pending = pending[:len(free)], pending[len(free):]
                pre = self.prefill([prompts[r] for r in batch], [sampling[r] for r in batch])
                if stats.ttft_s is None:
                    stats.ttft_s = time.perf_counter() - t0
                for i, req in enumerate(batch):
                    emit, go_on = verdict(req, pre.first_ids[i], pre.lengths[i])
                    if emit:
                        yield req, pre.first_ids[i]
                    if go_on:
                        self.insert(pre, i, free[i], sampling[req])
                        owner[free[i]] = req
                continue
            t = time.perf_counter()
            ids = self.generate(ahead=not pending)  # with requests waiting, an insert may follow
            stats.decode_s += time.perf_counter() - t
            stats.decode_steps += self.k
            for j, row in enumerate(ids):
                for slot, req in list(owner.items()):  # a request ended at row j ignores the rest
                    emit, go_on = verdict(req, int(row[slot]), int(self.row_positions(j)[slot]))
                    if emit:
                        yield req, int(row[slot])
                    if not go_on:
                        del owner[slot]
        stats.total_s = time.perf_counter() - t0

    def generate_ids(self, prompts: Sequence[Sequence[int]],
                     sampling: Sequence[SamplingParams] | SamplingParams) -> list[list[int]]:
        """Generated token ids of every prompt (blocking)."""
        out: list[list[int]] = [[] for _ in prompts]
        for req, tok in self.stream(prompts, sampling):
            out[req].append(tok)
        return out


def _insert_fn(cache, pre_cache, index, slot):
    """cache[.., slot, :L] <- pre_cache[.., index] for every cache array [.., B, S, K, D] (a stacked
    [Y, B, S, K, D] or one layer's [B, S, K, D]; L: the prefill bucket)."""
    def put(dst, src):
        b = src.ndim - 4
        row = jax.lax.dynamic_index_in_dim(src, index, axis=b, keepdims=True)  # [.., 1, L, K, D]
        return jax.lax.dynamic_update_slice_in_dim(dst, row.astype(dst.dtype), slot, axis=b)
    return jax.tree.map(put, cache, pre_cache)


@dataclass
class RunStats:
    ttft_s: float | None = None  # start -> first token of the first prefill batch
    prefill_shape: tuple[int, int] = (0, 0)  # (B, L) of the last prefill, padded to its buckets
    decode_s: float = 0.0  # time in decode steps
    decode_steps: int = 0
    total_s: float = 0.0
    finish: dict[int, str] = field(default_factory=dict)  # request -> "stop" | "length"

    @property
    def decode_s_per_step(self) -> float:
        return self.decode_s / self.decode_steps if self.decode_steps else 0.0


# ---- text ----------------------------------------------------------------------------------------
class Detokenizer:
    """Token ids -> text deltas for one request: never emits half a UTF-8 character, holds back
    text that could be the start of a stop string, and ends the request at a stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the request's text so far (cut before a stop string once found)
        self.emitted = ""
        self.stopped = False

    def add(self, tok: int) -> bool:
        """Append a token; False once a stop string has appeared (the request should end)."""
        self.ids.append(tok)
        text = self.decode(self.ids)
        cuts = [i for i in (text.find(s, max(0, len(self.emitted))) for s in self.stop) if i >= 0]
        if cuts:
            text, self.stopped = text[:min(cuts)], True
        self.text = text
        return not self.stopped

    def delta(self, final: bool = False) -> str:
        """The text not yet emitted that is safe to emit now (everything, when final)."""
        t = self.text
        if not (final or self.stopped):
            t = t.rstrip("\ufffd")  # an incomplete multi-byte character decodes to U+FFFD
            t = t[:max(0, len(t) - self.hold)]
        if len(t) <= len(self.emitted):
            return ""
        d = t[len(self.emitted):]
        self.emitted = t
        return d


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


class TextGenerator:
    """Text in, text out: tokenizer + engine. `stream` yields text deltas; `complete` whole texts."""

    def __init__(self, engine: Engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer

    def encode(self, prompt: str | list[dict[str, str]], chat: bool = False) -> list[int]:
        """Prompt ids: plain text, or (chat) a user message / a list of messages through the chat template."""
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_special=False)
        return self.tokenizer.encode(prompt)

    def stream_many(self, prompt_ids: Sequence[Sequence[int]], sampling: Sequence[SamplingParams] | SamplingParams,
                    ) -> Iterator[tuple[int, str, Detokenizer]]:
        """(request, text delta, its detokenizer) as tokens arrive; a final delta per request at its end."""
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompt_ids)
        detoks = [Detokenizer(self.tokenizer.decode, sp.stop) for sp in sampling]
        for req, tok in self.engine.stream(prompt_ids, sampling, accept=lambda r, t: detoks[r].add(t)):
            d = detoks[req].delta()
            if d:
                yield req, d, detoks[req]
        for req, dt in enumerate(detoks):
            yield req, dt.delta(final=True), dt

    def stream(self, prompt: str | list[dict[str, str]], sampling: SamplingParams, chat: bool = False) -> Iterator[str]:
        """Text deltas of one prompt's continuation."""
        for _, d, _ in self.stream_many([self.encode(prompt, chat)], sampling):
            if d:
                yield d

    def complete(self, prompts: Sequence[str], sampling: Sequence[SamplingParams] | SamplingParams,
                 chat: bool = False) -> list[Completion]:
        ids = [self.encode(p, chat) for p in prompts]
        detoks: dict[int, Detokenizer] = {}
        for req, _, dt in self.stream_many(ids, sampling):
            detoks[req] = dt
        return [Completion(ids[r], detoks[r].ids, detoks[r].text, self.engine.stats.finish.get(r, "length"))
                for r in range(len(prompts))]
