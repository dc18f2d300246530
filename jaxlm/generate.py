"""The sampling engine: a fixed set of decoding rows over a preallocated KV cache, refilled
with the next waiting prompt as rows finish (continuous batching).

Every row owns `P + N` cache slots (P the prompt bucket, N `max_new_tokens`) used as a
ring: all rows write their next token at the same slot (`t mod (P + N)` at step t), so a
decode step updates each layer's cache in place with one slice, while each row's
positions start from 0 at its own first token. A prompt joins a free row by a prefill of
its own (left-padded to P) whose keys and values are copied into the P slots before the
ring's current one; the row's earlier, finished request is what they overwrite. The
host runs the decode loop in chunks of `chunk` steps while prompts wait, and refills the
rows that finished between chunks; once none wait, one call decodes until every row is
done. With as many rows as prompts (the default) that is one prefill and one decode
call: static batching. A prompt's `samples` (a GRPO group) share one prefill.

One compiled program serves a (rows, P, N, sampling) bucket; `Engine` keeps them, and
callers pad lengths to buckets.

Per-token log-probs are those of the distribution sampled from before top-k/top-p
truncation, log softmax(logits / temperature) (temperature 1 for greedy), which is what
a training forward pass recomputes on the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from jaxlm import model, sharding
from jaxlm.config import frozen_model


@dataclasses.dataclass(frozen=True)
class Sampling:
  max_new_tokens: int = 128
  temperature: float = 1.0      # 0: greedy
  top_k: int = 0                # 0: off
  top_p: float = 1.0            # 1: off
  stop: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end a row (with EOS)


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray            # [N, max_new_tokens] int32, 0 after a row's end
  logprobs: np.ndarray          # [N, max_new_tokens] float32, 0 after a row's end
  lengths: np.ndarray           # [N] tokens generated, the EOS or stop sequence included
  finished: np.ndarray          # [N] bool: ended by EOS or a stop sequence


class Snapshot(NamedTuple):
  """Weights as decoding reads them (`Engine.snapshot`), held apart from the params they
  came from: a generate call may read them while those params are updated in place."""
  weights: dict
  lora: model.Lora | None


class Rows(NamedTuple):
  """The decoding rows on the device (B rows, N = max_new_tokens)."""
  cache: model.Cache    # B rows x (P + N) slots, a ring written at slot t % (P + N)
  logits: jax.Array     # [B, V] float32: each row's next-token logits
  position: jax.Array   # [B] the next token's position
  tokens: jax.Array     # [B, N] generated so far
  logprobs: jax.Array   # [B, N]
  length: jax.Array     # [B] tokens generated
  limit: jax.Array      # [B] the row's request's max_new_tokens
  done: jax.Array       # [B] finished, or free
  finished: jax.Array   # [B] ended by EOS or a stop sequence
  key: jax.Array        # [B, 2] the row's completion's sampling key
  t: jax.Array          # () steps taken: the ring's next slot is t % (P + N)


def filter_logits(logits_BV, top_k: int, top_p: float):
  """Logits with everything outside the top-k and the top-p nucleus set to -inf."""
  if top_k > 0:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BV, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    cutoff = jnp.min(jnp.where(before < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff, -jnp.inf, logits_BV)
  return logits_BV


def _pick(logits_BV, key_B, sampling: Sampling, vocab_size: int):
  """(token, its log-prob) of each row, sampled with the row's own key."""
  temperature = sampling.temperature if sampling.temperature > 0 else 1.0
  scaled = logits_BV.astype(jnp.float32) / temperature
  logp_BV = jax.nn.log_softmax(scaled, axis=-1)  # over every id, as training computes it
  if vocab_size and vocab_size < scaled.shape[-1]:  # never the vocabulary's padding ids
    scaled = jnp.where(jnp.arange(scaled.shape[-1]) < vocab_size, scaled, -jnp.inf)
  if sampling.temperature <= 0:
    token = jnp.argmax(scaled, axis=-1)
  else:
    token = jax.vmap(jax.random.categorical)(
        key_B, filter_logits(scaled, sampling.top_k, sampling.top_p))
  return token.astype(jnp.int32), jnp.take_along_axis(logp_BV, token[:, None], -1)[:, 0]


def _ended(tokens_BN, length_B, token_B, eos_id: int, stops):
  """Whether each row's newest token (at index length_B) is EOS or completes a stop
  sequence."""
  hit = token_B == eos_id
  N = tokens_BN.shape[1]
  for s in stops:  # the last len(s) tokens equal s
    L = s.shape[0]
    at_BL = length_B[:, None] - (L - 1) + jnp.arange(L)[None, :]
    window = jnp.take_along_axis(tokens_BN, jnp.clip(at_BL, 0, N - 1), axis=1)
    hit |= jnp.all(window == s[None], axis=-1) & (length_B + 1 >= L)
  return hit


def _prepare(params, *, cfg, joined: bool):
  """The weights as decoding reads them: in the compute dtype, one dict a layer, and
  (`joined`) each layer's projections joined. Once a generate call, outside its loop."""
  params = model.unstack_layers(model.compute_weights(params, cfg))
  return model.fuse_projections(params, cfg) if joined else params


def _empty(weights, *, cfg, rows: int, slots: int, max_new_tokens: int, sharder) -> Rows:
  """`rows` free rows of `slots` empty cache slots, the ring's next slot after a prompt's."""
  w = weights["embed"] if cfg.tie_embeddings else weights["lm_head"]
  V = w.shape[0] if cfg.tie_embeddings else w.shape[1]
  B, N = rows, max_new_tokens
  return Rows(model.init_cache(cfg, B, slots, sharder), jnp.zeros((B, V), jnp.float32),
              jnp.zeros((B,), jnp.int32), jnp.zeros((B, N), jnp.int32),
              jnp.zeros((B, N), jnp.float32), jnp.zeros((B,), jnp.int32),
              jnp.zeros((B,), jnp.int32), jnp.ones((B,), bool), jnp.zeros((B,), bool),
              jnp.zeros((B, 2), jnp.uint32), jnp.int32(slots - max_new_tokens))


def _refill(weights, rows: Rows, prompt_RP, prompt_len_R, source_Q, row_Q, limit_Q,
            completion_Q, rng, lora, *, cfg, sharder) -> Rows:
  """Prefill R prompts (left-padded to P) and start completion completion_Q[q] in row
  row_Q[q] from prompt source_Q[q]'s prefill (rows >= B: padding, dropped): its keys and
  values go to the P slots before the ring's next one, the rest of the row's slots
  become empty, and it samples with the call's key folded with its index (the same
  tokens whichever row and step it starts at)."""
  R, P = prompt_RP.shape
  S = rows.cache.valid.shape[1]
  pad_R = P - prompt_len_R
  slot_P = jnp.arange(P)
  valid_RP = slot_P[None, :] >= pad_R[:, None]
  positions_RP = jnp.maximum(slot_P[None, :] - pad_R[:, None], 0)
  logits, new = model.forward_cached(weights, prompt_RP, cfg, model.init_cache(cfg, R, P, sharder),
                                     0, positions=positions_RP, valid_BT=valid_RP,
                                     sharder=sharder, lora=lora, last_only=True)
  ring_P = (rows.t - P + slot_P) % S

  def put(old, fresh):  # the prefill's slots [Q, G, P, K] of each source into its rows
    out = old.at[row_Q[:, None], :, ring_P[None, :]].set(
        jnp.swapaxes(fresh[source_Q], 1, 2).astype(old.dtype), mode="drop")
    return out if sharder is None else sharder.constrain(out, model.CACHE_AXES)
  valid = rows.cache.valid.at[row_Q].set(False, mode="drop").at[
      row_Q[:, None], ring_P[None, :]].set(valid_RP[source_Q], mode="drop")
  cache = model.Cache(tuple(map(put, rows.cache.k, new.k)), tuple(map(put, rows.cache.v, new.v)),
                      valid)
  start = lambda x, value: x.at[row_Q].set(value, mode="drop")  # noqa: E731
  return Rows(cache, start(rows.logits, logits[source_Q, -1].astype(jnp.float32)),
              start(rows.position, prompt_len_R[source_Q]), start(rows.tokens, 0),
              start(rows.logprobs, 0.0), start(rows.length, 0), start(rows.limit, limit_Q),
              start(rows.done, False), start(rows.finished, False),
              start(rows.key, jax.vmap(lambda i: jax.random.fold_in(rng, i))(completion_Q)),
              rows.t)


def _decode(weights, rows: Rows, lora, *, cfg, sampling: Sampling, eos_id: int,
            vocab_size: int, sharder, steps: int) -> Rows:
  """Up to `steps` token steps of every unfinished row (fewer once all are done)."""
  B, N = rows.tokens.shape
  S = rows.cache.valid.shape[1]
  index_B = jnp.arange(B)
  stops = [jnp.asarray(s, jnp.int32) for s in sampling.stop]

  def body(state):
    i, r = state
    key_B = jax.vmap(jax.random.fold_in)(r.key, r.length)  # token n's key: the row's, n
    token, logp = _pick(r.logits, key_B, sampling, vocab_size)
    live = ~r.done
    at = jnp.where(live, r.length, N)  # a finished or free row writes nothing
    tokens = r.tokens.at[index_B, at].set(token, mode="drop")
    hit = live & _ended(tokens, r.length, token, eos_id, stops)
    length = r.length + live
    logits, cache = model.forward_cached(
        weights, token[:, None], cfg, r.cache, r.t % S, positions=r.position[:, None],
        valid_BT=live[:, None], sharder=sharder, lora=lora)
    return i + 1, Rows(cache, logits[:, 0], r.position + live, tokens,
                       r.logprobs.at[index_B, at].set(logp, mode="drop"), length, r.limit,
                       r.done | hit | (length >= r.limit), r.finished | hit, r.key, r.t + 1)

  def cond(state):
    return (state[0] < steps) & ~jnp.all(state[1].done)

  return jax.lax.while_loop(cond, body, (jnp.int32(0), rows))[1]


def _shards_heads(sharder) -> bool:
  """Whether the mesh splits attention heads or the MLP (tensor parallelism): joining the
  projections' weights along those axes would move them between devices."""
  if sharder is None:
    return False
  for name in ("heads", "kv_heads", "mlp"):
    axes = sharder.spec((name,))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if math.prod(sharder.mesh.shape[a] for a in axes) > 1:
      return True
  return False


def check_length(cfg, prompt_len: int, max_new_tokens: int):
  """Learned positions (gpt2) end at max_seq_len: past it there is no embedding."""
  if cfg.family == "gpt2" and prompt_len + max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"prompt bucket {prompt_len} + max_new_tokens {max_new_tokens} exceeds "
                     f"the model's max_seq_len={cfg.max_seq_len} (learned positions)")


def completion_ids(tokens, length: int, eos_id: int, stop: tuple[int, ...]) -> list[int]:
  """A row's generated ids without the EOS or stop sequence that ended it."""
  ids = [int(t) for t in tokens[:length]]
  if ids and ids[-1] == eos_id:
    ids = ids[:-1]
  if stop and tuple(ids[-len(stop):]) == stop:
    ids = ids[:-len(stop)]
  return ids


def bucket(n: int, smallest: int = 16) -> int:
  return max(smallest, 1 << (max(n, 1) - 1).bit_length())


class Engine:
  """Batched generation for one model: compiled once per (rows, prompt bucket, sampling),
  on the devices of `sharder` (rows over data x fsdp, weights as the caller placed them).
  `chunk`: decode steps between refills while prompts wait for a free row."""

  def __init__(self, cfg, *, eos_id: int, vocab_size: int = 0, sharder=None, chunk: int = 16):
    """`vocab_size`: the tokenizer's; ids past it (the model's padding to
    model.vocab_multiple) are never sampled."""
    self.cfg = frozen_model(cfg)  # a static part of every compiled program
    self.eos_id, self.sharder, self.vocab_size, self.chunk = eos_id, sharder, vocab_size, chunk
    self._compiled = {}

  def _jit(self, name: str, fn, **static):
    """`fn` jitted with these static arguments (and the engine's model), once."""
    key = (name, *sorted(static.items()))
    if key not in self._compiled:
      # The rows are donated: each refill and decode call updates them in place.
      donate = (1,) if name in ("refill", "decode") else ()
      with_sharder = {} if name == "prepare" else {"sharder": self.sharder}
      self._compiled[key] = jax.jit(functools.partial(fn, cfg=self.cfg, **static, **with_sharder),
                                    donate_argnums=donate)
    return self._compiled[key]

  def _put(self, x):
    """A host array every process holds whole -> the device(s), rows over the mesh."""
    if self.sharder is None:
      return jnp.asarray(x)
    return sharding.global_batch({"x": x}, self.sharder)["x"]

  def _rows_bucket(self, n: int, rows: int) -> int:
    """Rows of a refill's arrays: at most `rows`, else the smallest of rows/8 (a multiple
    of the data-parallel size) times a power of two that holds `n`: four programs at
    most, whatever the refill sizes."""
    dp = self.sharder.data_parallel_size if self.sharder is not None else 1
    smallest = max(dp, rows // 8 // dp * dp)
    return min(rows, smallest * (1 << (-(-n // smallest) - 1).bit_length()))

  def _weights(self, params, lora):
    joined = lora is None and not _shards_heads(self.sharder)  # LoRA adapts wq, wk, ... apart
    return self._jit("prepare", _prepare, joined=joined)(params)

  def snapshot(self, params, lora=None) -> Snapshot:
    """The weights as generate reads them, in buffers of their own: the caller may then
    donate or update `params` and `lora` while a generate call decodes from this."""
    weights = self._weights(params, lora)
    given = {id(x) for x in jax.tree.leaves((params, lora))}
    own = lambda x: jnp.copy(x) if id(x) in given else x  # noqa: E731  # passed through
    if lora is not None:  # the adapters are trained: copied; scale and dropout stay
      lora = lora._replace(adapters=jax.tree.map(jnp.copy, lora.adapters))
    return Snapshot(jax.tree.map(own, weights), lora)

  # long: the host's scheduling loop (refill free rows, decode a chunk, collect the done)
  def generate(self, params, prompts: list, rng, sampling: Sampling, *, rows: int = 0,
               prompt_len: int = 0, lora=None, samples: int = 1,
               max_new_tokens: list | None = None) -> Generation:
    """Completions of id-sequence prompts (BOS first), `samples` a prompt (a GRPO group:
    prompt i's in results i * samples .. i * samples + samples - 1, from one prefill).
    `params` may be a `snapshot` (then `lora` is the snapshot's).
    Completion c samples with `rng` folded with c: the same tokens for any `rows`.
    `rows`: rows decoding at once (default: every completion at once); with fewer, a row
    that finishes takes the next waiting completion. Rows are padded to a multiple of
    the data-parallel size and `prompt_len` the prompts to a fixed length (default: the
    bucket of the longest), so calls share one program. `max_new_tokens`: a budget per
    prompt, at most sampling.max_new_tokens."""
    n, N = len(prompts), sampling.max_new_tokens
    total = n * samples
    dp = self.sharder.data_parallel_size if self.sharder is not None else 1
    rows = -(-max(rows or total, 1) // dp) * dp
    longest = max(len(p) for p in prompts)
    P = prompt_len or bucket(longest)
    if P < longest:
      raise ValueError(f"prompt_len={P} is shorter than a prompt of {longest} tokens")
    check_length(self.cfg, P, N)
    budget = np.full(n, N, np.int32) if max_new_tokens is None else \
        np.asarray(max_new_tokens, np.int32)
    if budget.shape != (n,) or budget.min(initial=1) < 1 or budget.max(initial=0) > N:
      raise ValueError(f"max_new_tokens: one budget a prompt, each in [1, {N}]")
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):  # a typed key: its raw words
      rng = jax.random.key_data(rng)
    weights, lora = ((params.weights, params.lora) if isinstance(params, Snapshot)
                     else (self._weights(params, lora), lora))
    state = self._jit("empty", _empty, rows=rows, slots=P + N, max_new_tokens=N)(weights)
    refill = self._jit("refill", _refill)
    decode = functools.partial(self._jit, "decode", _decode, sampling=sampling,
                               eos_id=self.eos_id, vocab_size=self.vocab_size)
    fetch = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
    out = Generation(np.zeros((total, N), np.int32), np.zeros((total, N), np.float32),
                     np.zeros(total, np.int32), np.zeros(total, bool))
    owner = np.full(rows, -1)          # the completion each row decodes, -1: free
    waiting = 0                        # completions are started in order
    while True:
      free = np.flatnonzero(owner < 0)[:total - waiting]
      if len(free):
        todo = np.arange(waiting, waiting + len(free))
        sources, source_of = np.unique(todo // samples, return_inverse=True)
        # The prompts' rows follow from the completions': a run of Q completions spans at
        # most Q / samples + 1 groups. One program per Q bucket.
        Q = self._rows_bucket(len(free), rows)
        R = self._rows_bucket(min(Q, -(-Q // samples) + 1), rows)
        tokens = np.zeros((R, P), np.int32)
        lengths = np.ones(R, np.int32)
        tokens[:, -1] = prompts[0][-1]  # padding: a one-token prompt, its rows dropped
        for j, i in enumerate(sources):
          tokens[j, P - len(prompts[i]):] = prompts[i]
          lengths[j] = len(prompts[i])
        pad = lambda x, fill: np.concatenate([x, np.full(Q - len(x), fill)]).astype(np.int32)  # noqa: E731
        state = refill(weights, state, self._put(tokens), self._put(lengths),
                       pad(source_of, 0), pad(free, rows), pad(budget[todo // samples], 1),
                       pad(todo, 0), rng, lora)
        owner[free] = todo
        waiting += len(free)
      steps = self.chunk if waiting < total else N  # nothing waits: decode to the end
      state = decode(steps=steps)(weights, state, lora)
      done = fetch(state.done)
      ended = np.flatnonzero(done & (owner >= 0))
      if len(ended):
        tokens, logprobs, length, finished = map(fetch, (state.tokens, state.logprobs,
                                                         state.length, state.finished))
        i = owner[ended]
        out.tokens[i], out.logprobs[i] = tokens[ended], logprobs[ended]
        out.lengths[i], out.finished[i] = length[ended], finished[ended]
        owner[ended] = -1
      if waiting == total and (owner < 0).all():
        return out
