"""The decoder-only transformer as pure functions over a plain parameter dict.

    params = init(model_config, rng)
    logits_BTV = forward(params, tokens_BT, model_config, segment_ids=..., positions=...)

Two families share the code: `llama` (RMSNorm, RoPE with optional Llama-3 or linear
scaling, a gated MLP, grouped-query attention, optional QKV bias as in Qwen2, optional
tied embeddings) and `gpt2` (learned positions, LayerNorm, GELU, biases everywhere; tie
the embeddings with `tie_embeddings`, as GPT-2 does). The llama family's options cover
Mistral, Qwen2/3, Gemma 2/3 and Phi-3 as well: qk-norm, (1 + weight) norms, sandwich
norms, GeGLU, scaled embeddings, a query scale, attention and final-logit soft-capping,
and local (sliding-window) layers in a repeating pattern with their own RoPE base.

Layers are stacked on a leading axis and run with `jax.lax.scan`; when local and global
layers alternate, the scan runs over repeats of the pattern (`layer_kinds`), so each
kind's attention stays a static choice.

Shape suffixes: B batch, T length, D d_model, H heads, G kv heads, K head dim,
F ffn dim, V vocab, L layers.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple
import zlib

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from jaxlm import attention, losses
from jaxlm.sharding import Sharder


def _dtype(name: str):
  return jnp.dtype(name)


def head_dim(cfg) -> int:
  return cfg.head_dim or cfg.d_model // cfg.num_heads


def param_shapes_and_axes(cfg) -> dict:
  """{name: (shape, logical axes)} for every parameter; layer params get a leading L."""
  D, H, G, K, F, V, L = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg),
                         cfg.ffn_dim, cfg.vocab_size, cfg.num_layers)
  gpt2 = cfg.family == "gpt2"
  top = {"embed": ((V, D), ("vocab", "embed")),
         "final_norm": ((D,), ("norm",))}
  layer = {
      "attn_norm": ((D,), ("norm",)),
      "wq": ((D, H, K), ("embed", "heads", "head_dim")),
      "wk": ((D, G, K), ("embed", "kv_heads", "head_dim")),
      "wv": ((D, G, K), ("embed", "kv_heads", "head_dim")),
      "wo": ((H, K, D), ("heads", "head_dim", "embed")),
      "mlp_norm": ((D,), ("norm",)),
      "w_up": ((D, F), ("embed", "mlp")),
      "w_down": ((F, D), ("mlp", "embed")),
  }
  if gpt2:
    top["pos_embed"] = ((cfg.max_seq_len, D), ("position", "embed"))
    top["final_norm_bias"] = ((D,), ("norm",))
    layer.update({"attn_norm_bias": ((D,), ("norm",)), "mlp_norm_bias": ((D,), ("norm",)),
                  "bo": ((D,), ("norm",)), "b_up": ((F,), ("mlp",)),
                  "b_down": ((D,), ("norm",))})
  else:
    layer["w_gate"] = ((D, F), ("embed", "mlp"))
    if cfg.qk_norm:
      layer.update({"q_norm": ((K,), ("norm",)), "k_norm": ((K,), ("norm",))})
    if cfg.post_norms:
      layer.update({"post_attn_norm": ((D,), ("norm",)), "post_mlp_norm": ((D,), ("norm",))})
  if gpt2 or cfg.qkv_bias:
    layer.update({"bq": ((H, K), ("heads", "head_dim")),
                  "bk": ((G, K), ("kv_heads", "head_dim")),
                  "bv": ((G, K), ("kv_heads", "head_dim"))})
  if not cfg.tie_embeddings:
    top["lm_head"] = ((D, V), ("embed", "vocab"))
  top["layers"] = {n: ((L, *s), ("layers", *a)) for n, (s, a) in layer.items()}
  return top


def _is_spec(x):
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def param_axes(cfg) -> dict:
  """The logical-axes tree matching `init`'s parameters."""
  return jax.tree.map(lambda s: s[1], param_shapes_and_axes(cfg), is_leaf=_is_spec)


def init(cfg, rng: jax.Array) -> dict:
  """Fresh parameters. Residual output projections are scaled by 1/sqrt(2L) (GPT-2)."""
  specs = param_shapes_and_axes(cfg)
  flat, treedef = jax.tree.flatten_with_path(specs, is_leaf=_is_spec)
  keys = jax.random.split(rng, len(flat))
  dtype = _dtype(cfg.param_dtype)
  out_scale = 1.0 / math.sqrt(2 * cfg.num_layers)
  leaves = []
  for (path, (shape, _)), key in zip(flat, keys):
    name = path[-1].key
    if "norm" in name and not name.endswith("bias"):  # (1 + weight) norms start at 0
      leaves.append(jnp.zeros(shape, dtype) if cfg.norm_plus_one else jnp.ones(shape, dtype))
    elif name.startswith("b") or name.endswith("bias"):
      leaves.append(jnp.zeros(shape, dtype))
    else:
      std = cfg.init_std * (out_scale if name in ("wo", "w_down") else 1.0)
      leaves.append((std * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
  return jax.tree.unflatten(treedef, leaves)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def flops_per_token(cfg, seq_len: int, weight_grads: bool = True) -> float:
  """PaLM-style training FLOPs per token: 6N + 12*L*d*T.

  N counts every weight used in a matmul: all parameters except the input embedding
  table (a gather) and, for gpt2, the position table; a tied embedding counts once,
  as the output projection. Without `weight_grads` (a frozen base, as under LoRA) the
  backward pass skips the weight gradients: 4N.
  """
  shapes = param_shapes_and_axes(cfg)
  n = sum(math.prod(s) for s, _ in jax.tree.leaves(shapes, is_leaf=_is_spec))
  n -= math.prod(shapes["embed"][0]) * (0 if cfg.tie_embeddings else 1)
  if "pos_embed" in shapes:
    n -= math.prod(shapes["pos_embed"][0])
  # Attention's score and value matmuls: each layer over the positions it attends to.
  seen = sum(min(seq_len, cfg.sliding_window) if local else seq_len for local in layer_kinds(cfg))
  return (6.0 if weight_grads else 4.0) * n + 12.0 * cfg.num_heads * head_dim(cfg) * seen


def layer_kinds(cfg) -> tuple[bool, ...]:
  """For each layer, whether it is local (attends within `sliding_window`): the
  `layer_pattern` repeated over the layers."""
  pattern = cfg.layer_pattern
  return tuple(pattern[i % len(pattern)] == "L" for i in range(cfg.num_layers))


def period(kinds) -> int:
  """The shortest p for which a sequence of layer kinds is repeats of its first p."""
  return next(p for p in range(1, len(kinds) + 1)
              if all(kinds[i] == kinds[i % p] for i in range(len(kinds))))


# ---------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x, scale, eps, plus_one: bool = False):
  """RMSNorm over the last axis in float32; `plus_one`: Gemma's (1 + scale)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  scale32 = scale.astype(jnp.float32)
  return (y * (1.0 + scale32 if plus_one else scale32)).astype(x.dtype)


def layer_norm(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(cfg, local: bool = False) -> jax.Array:
  """Inverse frequencies [K/2], scaled when rope_scaling_factor > 0 (Llama 3's way or
  linearly); a local layer's from `rope_local_theta`, unscaled, when that is set."""
  K = head_dim(cfg)
  exponents = jnp.arange(0, K, 2, dtype=jnp.float32) / K
  if local and cfg.rope_local_theta > 0:
    return 1.0 / (cfg.rope_local_theta ** exponents)
  inv = 1.0 / (cfg.rope_theta ** exponents)
  if cfg.rope_scaling_factor > 0 and cfg.rope_scaling_type == "linear":
    return inv / cfg.rope_scaling_factor
  if cfg.rope_scaling_factor > 0:
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_len
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    inv = jnp.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
  return inv


def apply_rope(x_BTHK, positions_BT, inv_freq):
  """Rotate-half RoPE (the Hugging Face Llama layout)."""
  angles_BTk = positions_BT[..., None].astype(jnp.float32) * inv_freq
  cos = jnp.cos(angles_BTk)[:, :, None, :]
  sin = jnp.sin(angles_BTk)[:, :, None, :]
  x = x_BTHK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHK.dtype)


def compute_weights(params, cfg):
  """Matmul weights and biases in the compute dtype, cast once: the layers would cast them
  the same way (so results do not change), but inside the scan that happens in every
  layer's forward, again in its rematerialized forward, and fused into each matmul; a
  decode step would read float32 weights each token. Norm scales stay as they are (the
  norms compute in float32)."""
  dt = jnp.dtype(cfg.dtype)

  def cast(path, x):
    if "norm" in path[-1].key or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return x.astype(dt)
  return jax.tree_util.tree_map_with_path(cast, params)


# "minimal" keeps each projection's output (named "proj" in _project, LoRA update
# included) and cuDNN attention's forward outputs, and recomputes the rest. Saving every
# matmul output instead would keep a LoRA update beside the weight's product: 8 GiB more
# at TinyLlama 1.1B, 8 x 2048.
_REMAT_POLICIES = {
    "minimal": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names("proj"), attention.saveable),
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _project(eq, x, p, name, dt, adapters, lora_scale, drop_rng, lora_dropout):
  """x @ p[name], plus the low-rank update lora_scale * dropout(x) @ A @ B when `adapters`
  has one for `name` (A: [in..., r], B: [r, out...]; see jaxlm.lora)."""
  y = jnp.einsum(eq, x, p[name].astype(dt))
  if adapters is None or name not in adapters:
    return checkpoint_name(y, "proj")
  a, b = adapters[name]["a"].astype(dt), adapters[name]["b"].astype(dt)
  if lora_dropout > 0 and drop_rng is not None:
    keep = jax.random.bernoulli(jax.random.fold_in(drop_rng, zlib.crc32(name.encode())),
                                1.0 - lora_dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - lora_dropout), 0).astype(x.dtype)
  update = jnp.tensordot(jnp.tensordot(x, a, axes=a.ndim - 1), b, axes=1)
  return checkpoint_name(y + (lora_scale * update).astype(y.dtype), "proj")


def attention_options(cfg, local: bool) -> attention.Options:
  """A layer's attention options: its window when local, the softcap, the query scale."""
  return attention.Options(window=cfg.sliding_window if local else 0,
                           softcap=cfg.attn_softcap,
                           scale=cfg.query_scale ** -0.5 if cfg.query_scale > 0 else 0.0)


# long: one block written out (norms, projections, RoPE, attention or the cache, MLP)
def _layer(cfg, impl, sharder, inv_freq, x_BTD, p, segment_ids_BT, positions_BT,
           adapters=None, lora_scale=1.0, drop_rng=None, lora_dropout=0.0, cache=None,
           local=False):
  """One transformer block (pre-norm; with `post_norms` also normed after each branch).
  `adapters`: this layer's LoRA A/B pairs, or None. `local`: attend within the window.

  With `cache` = (k [B, S, G, K], v, key_valid [B, S], index) (decoding), the block's
  keys and values are written at slots index..index+T-1 and attention reads the whole
  cache; it then returns (x, (k, v))."""
  dt = _dtype(cfg.dtype)
  gpt2 = cfg.family == "gpt2"
  c = sharder.constrain if sharder is not None else (lambda x, _: x)
  proj = lambda eq, x, name: _project(eq, x, p, name, dt, adapters, lora_scale,  # noqa: E731
                                      drop_rng, lora_dropout)
  options = attention_options(cfg, local)

  def norm(x, name):
    if gpt2:
      return layer_norm(x, p[name], p[name + "_bias"], cfg.norm_eps)
    return rms_norm(x, p[name], cfg.norm_eps, cfg.norm_plus_one)

  h = norm(x_BTD, "attn_norm")
  if "wqkv" in p:  # decoding's joined projections (fuse_projections)
    q, k, v = jnp.split(proj("btd,dhk->bthk", h, "wqkv"),
                        [cfg.num_heads, cfg.num_heads + cfg.num_kv_heads], axis=2)
  else:
    q = proj("btd,dhk->bthk", h, "wq")
    k = proj("btd,dgk->btgk", h, "wk")
    v = proj("btd,dgk->btgk", h, "wv")
  if "bq" in p:
    q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
  if "q_norm" in p:  # per head, over head_dim
    q, k = norm(q, "q_norm"), norm(k, "k_norm")
  if not gpt2:
    q = apply_rope(q, positions_BT, inv_freq)
    k = apply_rope(k, positions_BT, inv_freq)
  q = c(q, ("batch", "length", "heads", "head_dim"))
  k = c(k, ("batch", "length", "kv_heads", "head_dim"))
  v = c(v, ("batch", "length", "kv_heads", "head_dim"))
  if cache is None:
    o = attention.attend(q, k, v, segment_ids_BT, impl, options)
  else:
    k_cache, v_cache, key_valid, index = cache
    put = lambda buf, new: c(jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        buf, jnp.swapaxes(new, 1, 2).astype(buf.dtype), index, 2), CACHE_AXES)
    k_cache, v_cache = put(k_cache, k), put(v_cache, v)
    o = attention.cached_attention(q, k_cache, v_cache, key_valid,
                                   index + jnp.arange(x_BTD.shape[1]), options)
    cache = (k_cache, v_cache)
  o = proj("bthk,hkd->btd", o, "wo")
  if gpt2:
    o = o + p["bo"].astype(dt)
  if "post_attn_norm" in p:
    o = norm(o, "post_attn_norm")
  x_BTD = c(x_BTD + o, ("batch", "length", "embed"))

  h = norm(x_BTD, "mlp_norm")
  if "w_gate_up" in p:
    gate, up = jnp.split(proj("btd,df->btf", h, "w_gate_up"), 2, axis=2)
  else:
    up = proj("btd,df->btf", h, "w_up")
    gate = None if gpt2 else proj("btd,df->btf", h, "w_gate")
  if gpt2:
    act = jax.nn.gelu(up + p["b_up"].astype(dt), approximate=True)
  elif cfg.mlp_activation == "gelu_tanh":
    act = jax.nn.gelu(gate, approximate=True) * up
  else:
    act = jax.nn.silu(gate) * up
  act = c(act, ("batch", "length", "mlp"))
  out = proj("btf,fd->btd", act, "w_down")
  if gpt2:
    out = out + p["b_down"].astype(dt)
  if "post_mlp_norm" in p:
    out = norm(out, "post_mlp_norm")
  out = c(x_BTD + out, ("batch", "length", "embed"))
  return out if cache is None else (out, cache)


class Lora(NamedTuple):
  """Low-rank adapters to apply in the forward pass (built by jaxlm.lora)."""
  adapters: Any          # {"layers": {name: {"a": [L, in..., r], "b": [L, r, out...]}}}
  scale: float           # alpha / rank
  dropout: float = 0.0   # on the adapters' input, when `rng` is given
  rng: Any = None


def _embed(params, tokens_BT, positions_BT, cfg, sharder):
  x = jnp.take(params["embed"], tokens_BT, axis=0).astype(_dtype(cfg.dtype))
  if cfg.scale_embeddings:  # sqrt(d_model) rounded to the compute dtype, as Gemma does
    x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
  if cfg.family == "gpt2":
    x = x + jnp.take(params["pos_embed"], positions_BT, axis=0).astype(x.dtype)
  if sharder is not None:
    x = sharder.constrain(x, ("batch", "length", "embed"))
  return x


def _final_norm(params, x, cfg):
  if cfg.family == "gpt2":
    return layer_norm(x, params["final_norm"], params["final_norm_bias"], cfg.norm_eps)
  return rms_norm(x, params["final_norm"], cfg.norm_eps, cfg.norm_plus_one)


def unrolls_layers(cfg, sharder: Sharder | None) -> bool:
  """Whether `model.layer_loop` unrolls the layers. `auto` unrolls only where each device
  holds the whole weights: sharded over fsdp or tensor, the loop keeps each layer's
  gathered weights and activations to one layer at a time."""
  if cfg.layer_loop != "auto":
    return cfg.layer_loop == "unroll"
  shape = sharder.mesh.shape if sharder is not None else {}
  return shape.get("fsdp", 1) * shape.get("tensor", 1) == 1


def hidden_states(params, tokens_BT, cfg, *, segment_ids=None, positions=None,
                  sharder: Sharder | None = None, lora: Lora | None = None):
  """Final-normed hidden states [B, T, D] in the compute dtype."""
  B, T = tokens_BT.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  impl = attention.resolve_impl(cfg.attention, cfg.dtype)
  x = _embed(params, tokens_BT, positions, cfg, sharder)
  inv_freqs = _inv_freqs(cfg)

  adapters = lora.adapters["layers"] if lora is not None else None
  drop_rngs = (jax.random.split(lora.rng, cfg.num_layers)
               if lora is not None and lora.rng is not None and lora.dropout > 0 else None)

  def block(local: bool):
    def run(x, xs):
      p, a, r = xs
      return _layer(cfg, impl, sharder, inv_freqs[local], x, p, segment_ids, positions, a,
                    lora.scale if lora else 1.0, r, lora.dropout if lora else 0.0,
                    local=local)
    if cfg.remat != "none":
      run = jax.checkpoint(run, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    return run

  # Unrolled, the scan is one program: XLA slices each layer's weights at fixed offsets
  # and schedules and fuses across layers (README, "Scan or unroll").
  unroll = True if unrolls_layers(cfg, sharder) else 1
  xs = (compute_weights(params["layers"], cfg), adapters, drop_rngs)
  kinds = layer_kinds(cfg)
  P = period(kinds)
  if P == 1:  # every layer alike: one scan over them
    run = block(kinds[0])
    x, _ = jax.lax.scan(lambda x, xs: (run(x, xs), None), x, xs, unroll=unroll)
    return _final_norm(params, x, cfg)
  # A repeating pattern (Gemma's local and global layers): the scan runs over its
  # repeats, each step the pattern's P layers in order; a partial repeat follows.
  runs = [block(k) for k in kinds[:P]]
  n = cfg.num_layers // P

  def pattern(x, xs_P):
    for j in range(P):
      x = runs[j](x, jax.tree.map(lambda t, j=j: t[j], xs_P))
    return x, None

  head = jax.tree.map(lambda t: t[:n * P].reshape(n, P, *t.shape[1:]), xs)
  x, _ = jax.lax.scan(pattern, x, head, unroll=unroll)
  for j in range(cfg.num_layers - n * P):
    x = runs[j](x, jax.tree.map(lambda t, i=n * P + j: t[i], xs))
  return _final_norm(params, x, cfg)


def _inv_freqs(cfg) -> dict:
  """RoPE's inverse frequencies for global (False) and local (True) layers."""
  if cfg.family != "llama":
    return {False: None, True: None}
  return {False: rope_frequencies(cfg), True: rope_frequencies(cfg, local=True)}


# ---------------------------------------------------------------------------------------
# Decoding with a KV cache (jaxlm.generate)


class Cache(NamedTuple):
  """Keys and values of every layer for `slots` positions, and which slots hold a token.
  The engine keeps one buffer per layer (tuples of L arrays), so a decode step updates
  each in place and reads no copy. Slots come after kv heads: attention's products are
  batched over (row, kv head), which are then the leading axes, as batched matmuls read
  them without a transposed copy of the cache."""
  k: tuple              # L x [B, G, S, K]
  v: tuple              # L x [B, G, S, K]
  valid: jax.Array      # [B, S] bool


CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


def init_cache(cfg, batch: int, slots: int, sharder: Sharder | None = None) -> Cache:
  shape = (batch, cfg.num_kv_heads, slots, head_dim(cfg))
  dt = _dtype(cfg.dtype)
  c = sharder.constrain if sharder is not None else (lambda x, _: x)
  zeros = lambda: c(jnp.zeros(shape, dt), CACHE_AXES)  # noqa: E731
  return Cache(tuple(zeros() for _ in range(cfg.num_layers)),
               tuple(zeros() for _ in range(cfg.num_layers)),
               c(jnp.zeros((batch, slots), bool), ("batch", "length")))


def fuse_projections(params, cfg) -> dict:
  """Per-layer params (from `unstack_layers`) with each layer's query, key and value
  weights joined into one `wqkv` [D, H + 2G, K] and its gate and up weights into one
  `w_gate_up` [D, 2F]: a decode step, whose matmuls are one token a row and bound by
  reading the weights, then launches three matmuls a layer fewer. The same products,
  split after the matmul. Done once per generate call, outside the decode loop."""
  def fuse(p):
    p = dict(p)
    p["wqkv"] = jnp.concatenate([p.pop("wq"), p.pop("wk"), p.pop("wv")], axis=1)
    if "w_gate" in p and cfg.family != "gpt2":
      p["w_gate_up"] = jnp.concatenate([p.pop("w_gate"), p.pop("w_up")], axis=1)
    return p
  return {**params, "layers": tuple(fuse(p) for p in params["layers"])}


def unstack_layers(params) -> dict:
  """params with `layers` as a tuple of per-layer dicts (from the stacked [L, ...] arrays):
  what forward_cached runs layer by layer. Done once per generate call, outside the decode
  loop, so no step slices (copies) a layer's weights out of the stack."""
  layers = params["layers"]
  L = jax.tree.leaves(layers)[0].shape[0]
  return {**params, "layers": tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(L))}


def forward_cached(params, tokens_BT, cfg, cache: Cache, index, *, positions, valid_BT,
                   sharder: Sharder | None = None, lora: Lora | None = None,
                   last_only: bool = False):
  """Logits [B, T, V] for tokens written at cache slots index..index+T-1, attending to
  every valid slot up to their own; returns (logits, updated cache). `valid_BT` marks
  which of the new tokens are real (left padding of a prompt is not). `last_only`:
  logits of the last position only, [B, 1, V] (a prefill needs no more). The layers run
  as straight-line code over `unstack_layers(params)` (a decode step computes one token a
  row: a loop's per-layer overhead and copies would be a large part of it)."""
  valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid_BT, index, 1)
  impl = "xla"
  inv_freqs = _inv_freqs(cfg)
  x = _embed(params, tokens_BT, positions, cfg, sharder)
  layers = params["layers"]
  if not isinstance(layers, tuple):
    layers = unstack_layers(params)["layers"]
  ks, vs = [], []
  for i, (p, local) in enumerate(zip(layers, layer_kinds(cfg))):
    a = None if lora is None else jax.tree.map(lambda t, i=i: t[i], lora.adapters["layers"])
    x, (k, v) = _layer(cfg, impl, sharder, inv_freqs[local], x, p, None, positions, a,
                       lora.scale if lora else 1.0, cache=(cache.k[i], cache.v[i], valid, index),
                       local=local)
    ks.append(k)
    vs.append(v)
  if last_only:
    x = x[:, -1:]
  logits = unembed(params, _final_norm(params, x, cfg), cfg, sharder)
  return logits, Cache(tuple(ks), tuple(vs), valid)


def _head_logits(h_BTD, w, tied=False):
  """h @ w with float32 output; `w` in h's dtype, [V, D] when `tied` (the embedding table,
  read without a transposed copy), else [D, V]."""
  return jnp.einsum("btd,vd->btv" if tied else "btd,dv->btv", h_BTD, w,
                    preferred_element_type=jnp.float32)


def _head_grads(g_BTV, h_BTD, w, tied=False):
  """The output head's two backward matmuls, from the logits' gradient in h's dtype
  (bf16 operands, float32 results): dh [B, T, D] and dw in w's layout."""
  f32 = jnp.float32
  dh = jnp.einsum("btv,vd->btd" if tied else "btv,dv->btd", g_BTV, w, preferred_element_type=f32)
  dw = (jnp.einsum("btv,btd->vd", g_BTV, h_BTD, preferred_element_type=f32) if tied else
        jnp.einsum("btd,btv->dv", h_BTD, g_BTV, preferred_element_type=f32))
  return dh, dw


@jax.custom_vjp
def _logits(h_BTD, w_DV):
  """h @ w with float32 output; the backward pass takes the logits' gradient in h's
  dtype, so both of its matmuls run on bf16 operands (as autocast does), not float32."""
  return _head_logits(h_BTD, w_DV)


def _logits_fwd(h_BTD, w_DV):
  return _logits(h_BTD, w_DV), (h_BTD, w_DV)


def _logits_bwd(res, g_BTV):
  h_BTD, w_DV = res
  dh, dw = _head_grads(g_BTV.astype(h_BTD.dtype), h_BTD, w_DV)
  return dh.astype(h_BTD.dtype), dw.astype(w_DV.dtype)


_logits.defvjp(_logits_fwd, _logits_bwd)


def unembed(params, h_BTD, cfg, sharder: Sharder | None = None):
  """Hidden states -> float32 logits [B, T, V]."""
  dt = _dtype(cfg.dtype)
  w_DV = params["embed"].astype(dt).T if cfg.tie_embeddings else params["lm_head"].astype(dt)
  logits = softcap(_logits(h_BTD, w_DV), cfg.final_softcap)
  if sharder is not None:
    logits = sharder.constrain(logits, ("batch", "length", "vocab"))
  return logits


def softcap(logits, cap: float):
  """cap * tanh(logits / cap) (Gemma 2's final-logit soft-capping); `cap` 0: as they are."""
  return cap * jnp.tanh(logits / cap) if cap > 0 else logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _head_stats(h_BTD, w, targets_BT, constrain, tied, cap=0.0):
  """`losses.token_stats` of the logits h @ w (float32), differentiable in h and w. `w`
  is the output head [D, V], or with `tied` the embedding table [V, D], in its stored
  dtype; it is cast to h's dtype here and its gradient goes back in the stored dtype (so
  chunks of positions add their parts in float32).

  The backward pass is written out: the logits' gradient, g_logZ * softmax + g_target *
  onehot(target), is one elementwise pass over the saved float32 logits that writes h's
  dtype (no scatter for the target, no float32 gradient of the whole logits), and both of
  its matmuls run on bf16 operands, as autocast's do. With `cap` the logits are
  soft-capped (`softcap`) and the gradient passes through tanh's derivative,
  1 - (capped / cap)^2, in the same elementwise pass."""
  return _head_stats_fwd(h_BTD, w, targets_BT, constrain, tied, cap)[0]


def _head_stats_fwd(h_BTD, w, targets_BT, constrain, tied, cap):
  w_c = w.astype(h_BTD.dtype)  # [V, D] tied, else [D, V]; no transposed copy
  logits = softcap(constrain(_head_logits(h_BTD, w_c, tied)), cap)
  stats = losses.token_stats(logits, targets_BT)
  # A scalar zero carries the stored dtype to the backward pass (residuals are arrays).
  return stats, (h_BTD, w_c, targets_BT, logits, stats[0], jnp.zeros((), w.dtype))


def _head_stats_bwd(constrain, tied, cap, res, g):
  h_BTD, w_c, targets_BT, logits, log_z_BT, w_dtype = res
  g_z, g_target, _ = g  # the argmax hit has no gradient
  onehot = targets_BT[..., None] == jnp.arange(logits.shape[-1], dtype=targets_BT.dtype)
  g_BTV = (g_z[..., None] * jnp.exp(logits - log_z_BT[..., None])
           + jnp.where(onehot, g_target[..., None], 0.0))
  if cap > 0:  # through cap * tanh(z / cap)
    g_BTV = g_BTV * (1.0 - jnp.square(logits / cap))
  g_BTV = g_BTV.astype(h_BTD.dtype)
  dh, dw = _head_grads(constrain(g_BTV), h_BTD, w_c, tied)
  return dh.astype(h_BTD.dtype), dw.astype(w_dtype.dtype), None


_head_stats.defvjp(_head_stats_fwd, _head_stats_bwd)


def token_stats(params, h_BTD, targets_BT, cfg, sharder: Sharder | None = None):
  """`losses.token_stats` (log Z, target logit, argmax hit; [B, T] float32 each) of the
  logits of hidden states `h_BTD`, with the output projection and the loss's gradient
  fused (`_head_stats`).

  With `cfg.logits_chunk` = C > 0 and T > C, positions go C at a time through a scan
  whose body is rematerialized: a chunk's logits [B, C, V] exist only while its stats
  are taken, and again in the backward pass (the output projection runs twice)."""
  B, T, D = h_BTD.shape
  w = params["embed"] if cfg.tie_embeddings else params["lm_head"]  # cast in _head_stats
  constrain = ((lambda x: sharder.constrain(x, ("batch", "length", "vocab")))
               if sharder is not None else (lambda x: x))
  C = cfg.logits_chunk
  if not C or T <= C:
    return _head_stats(h_BTD, w, targets_BT, constrain, cfg.tie_embeddings, cfg.final_softcap)
  n = -(-T // C)
  pad = n * C - T
  h = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0))) if pad else h_BTD
  t = jnp.pad(targets_BT, ((0, 0), (0, pad))) if pad else targets_BT
  h_NBCD = jnp.swapaxes(h.reshape(B, n, C, D), 0, 1)
  t_NBC = jnp.swapaxes(t.reshape(B, n, C), 0, 1)

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def chunk(h_BCD, t_BC):
    return _head_stats(h_BCD, w, t_BC, constrain, cfg.tie_embeddings, cfg.final_softcap)

  _, stats = jax.lax.scan(lambda _, xs: (None, chunk(*xs)), None, (h_NBCD, t_NBC))
  return tuple(jnp.swapaxes(x, 0, 1).reshape(B, n * C)[:, :T] for x in stats)


def forward(params, tokens, config, *, segment_ids=None, positions=None,
            sharder: Sharder | None = None, lora: Lora | None = None):
  """Logits [B, T, V] (float32) for tokens [B, T].

  `segment_ids` (0 = padding) keep packed documents from attending to each other;
  `positions` restart per document. `sharder` (optional) constrains activations.
  `lora` (optional) adds low-rank adapters to the layers' projections.
  """
  h = hidden_states(params, tokens, config, segment_ids=segment_ids, positions=positions,
                    sharder=sharder, lora=lora)
  return unembed(params, h, config, sharder)
