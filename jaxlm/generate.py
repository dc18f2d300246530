"""The sampling engine: jitted prefill, then a decode loop over a preallocated KV cache.

Prompts of different lengths are left-padded to a shared bucket length P, so every row
writes its next token at the same cache slot (P, P+1, ...) while its positions start
from 0 at its own first token. One compiled program serves a (batch, P, max_new_tokens,
sampling) bucket: `Engine` keeps them, and callers pad batches and lengths to buckets.

Per-token log-probs are those of the distribution sampled from before top-k/top-p
truncation, log softmax(logits / temperature) (temperature 1 for greedy), which is what
a training forward pass recomputes on the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math

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


def _generate(params, prompt_BP, prompt_len_B, rng, *, cfg, sampling: Sampling, eos_id: int,
              vocab_size: int, sharder, lora, samples: int = 1):
  B, P = prompt_BP.shape
  params = model.unstack_layers(model.compute_weights(params, cfg))
  if lora is None and not _shards_heads(sharder):  # LoRA adapts wq, wk, ... one by one
    params = model.fuse_projections(params, cfg)
  N = sampling.max_new_tokens
  slots = P + N
  cache = model.init_cache(cfg, B, slots, sharder)
  pad_B = P - prompt_len_B
  slot_P = jnp.arange(P)
  valid_BP = slot_P[None, :] >= pad_B[:, None]
  positions_BP = jnp.maximum(slot_P[None, :] - pad_B[:, None], 0)
  logits, cache = model.forward_cached(params, prompt_BP, cfg, cache, 0, positions=positions_BP,
                                       valid_BT=valid_BP, sharder=sharder, lora=lora,
                                       last_only=True)
  if samples > 1:  # each prompt's samples start from its one prefill: its cache repeated
    logits, cache, prompt_len_B = _repeat_rows((logits, cache, prompt_len_B), samples, sharder)
    B *= samples
  temperature = sampling.temperature if sampling.temperature > 0 else 1.0
  stops = [jnp.asarray(s, jnp.int32) for s in sampling.stop]

  def pick(logits_BV, key):
    scaled = logits_BV.astype(jnp.float32) / temperature
    logp_BV = jax.nn.log_softmax(scaled, axis=-1)  # over every id, as training computes it
    if vocab_size and vocab_size < scaled.shape[-1]:  # never the vocabulary's padding ids
      scaled = jnp.where(jnp.arange(scaled.shape[-1]) < vocab_size, scaled, -jnp.inf)
    if sampling.temperature <= 0:
      token = jnp.argmax(scaled, axis=-1)
    else:
      token = jax.random.categorical(key, filter_logits(scaled, sampling.top_k, sampling.top_p))
    return token.astype(jnp.int32), jnp.take_along_axis(logp_BV, token[:, None], -1)[:, 0]

  def ended(out_BN, step, token_B):
    hit = token_B == eos_id
    for s in stops:  # the last len(s) tokens equal s
      L = s.shape[0]
      window = jax.lax.dynamic_slice_in_dim(jnp.pad(out_BN, ((0, 0), (L, 0))), step + 1, L, 1)
      hit |= jnp.all(window == s[None], axis=-1) & (step + 1 >= L)
    return hit

  def body(state):
    step, logits_BV, cache, rng, out, logps, done, length = state
    rng, key = jax.random.split(rng)
    token, logp = pick(logits_BV, key)
    token = jnp.where(done, 0, token)
    logp = jnp.where(done, 0.0, logp)
    length = length + (~done).astype(jnp.int32)
    out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, 1)
    logps = jax.lax.dynamic_update_slice_in_dim(logps, logp[:, None], step, 1)
    done = done | ended(out, step, token)
    logits, cache = model.forward_cached(
        params, token[:, None], cfg, cache, P + step, positions=(prompt_len_B + step)[:, None],
        valid_BT=jnp.ones((B, 1), bool), sharder=sharder, lora=lora)
    return step + 1, logits[:, 0], cache, rng, out, logps, done, length

  def cond(state):
    step, done = state[0], state[6]
    return (step < N) & ~jnp.all(done)

  init = (jnp.int32(0), logits[:, -1], cache, rng, jnp.zeros((B, N), jnp.int32),
          jnp.zeros((B, N), jnp.float32), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))
  _, _, _, _, out, logps, done, length = jax.lax.while_loop(cond, body, init)
  return out, logps, length, done


def _repeat_rows(tree, times: int, sharder):
  """Each row `times` times in a row (row i -> rows i*times .. i*times + times - 1); the
  KV buffers keep the cache's sharding (rows like a batch, heads as the mesh splits them)."""
  def rep(x):
    x = jnp.repeat(x, times, axis=0)
    if sharder is not None and x.ndim == 4:  # [B, S, G, K] keys or values
      x = sharder.constrain(x, ("batch", "length", "kv_heads", "head_dim"))
    return x
  return jax.tree.map(rep, tree)


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
  on the devices of `sharder` (rows over data x fsdp, weights as the caller placed them)."""

  def __init__(self, cfg, *, eos_id: int, vocab_size: int = 0, sharder=None):
    """`vocab_size`: the tokenizer's; ids past it (the model's padding to
    model.vocab_multiple) are never sampled."""
    self.cfg = frozen_model(cfg)  # a static part of every compiled program
    self.eos_id, self.sharder, self.vocab_size = eos_id, sharder, vocab_size
    self._compiled = {}

  def _fn(self, sampling: Sampling, with_lora: bool, samples: int):
    key = (sampling, with_lora, samples)
    if key not in self._compiled:
      fn = functools.partial(_generate, cfg=self.cfg, sampling=sampling, eos_id=self.eos_id,
                             vocab_size=self.vocab_size, sharder=self.sharder, samples=samples)
      self._compiled[key] = jax.jit(lambda p, t, n, r, lora: fn(p, t, n, r, lora=lora))
    return self._compiled[key]

  def generate(self, params, prompts: list, rng, sampling: Sampling, *, rows: int = 0,
               prompt_len: int = 0, lora=None, samples: int = 1) -> Generation:
    """Completions of id-sequence prompts (BOS first). `rows` pads the batch to a fixed
    row count (a multiple of the data-parallel size) and `prompt_len` the prompts to a
    fixed length (default: the bucket of the longest), so calls share one program.
    `samples`: completions per prompt (a GRPO group), prompt i's in rows i * samples to
    i * samples + samples - 1; the prompt is prefilled once and its cache repeated."""
    n = len(prompts)
    dp = self.sharder.data_parallel_size if self.sharder is not None else 1
    rows = max(rows, n)
    rows = -(-rows // dp) * dp
    longest = max(len(p) for p in prompts)
    P = prompt_len or bucket(longest)
    if P < longest:
      raise ValueError(f"prompt_len={P} is shorter than a prompt of {longest} tokens")
    check_length(self.cfg, P, sampling.max_new_tokens)
    tokens = np.zeros((rows, P), np.int32)
    lengths = np.ones(rows, np.int32)
    for i, p in enumerate(prompts):
      tokens[i, P - len(p):] = p
      lengths[i] = len(p)
    tokens[n:, -1] = prompts[0][-1]  # padding rows: a one-token prompt, discarded
    if self.sharder is not None:
      batch = sharding.global_batch({"t": tokens, "n": lengths}, self.sharder)
      tokens_in, lengths_in = batch["t"], batch["n"]
    else:
      tokens_in, lengths_in = jnp.asarray(tokens), jnp.asarray(lengths)
    out, logps, lens, done = self._fn(sampling, lora is not None, samples)(
        params, tokens_in, lengths_in, rng, lora)
    fetch = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))[:n * samples]  # noqa: E731
    return Generation(fetch(out), fetch(logps), fetch(lens), fetch(done))
