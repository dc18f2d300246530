"""Causal attention with packed-sequence masking, one interface over three kernels.

    attend(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, impl) -> out_BTHK

`xla` is the reference and runs everywhere; `cudnn` is cuDNN flash attention on NVIDIA
GPUs through `jax.nn.dot_product_attention`; `splash` is the Pallas TPU kernel.
Tokens attend only to earlier tokens of the same segment (segment 0 is padding).

Every kernel takes the same three options (`Options`): a sliding `window` (a query sees
the `window` positions ending at its own; 0: all earlier ones), a `softcap` of the
scores (cap * tanh(s / cap), Gemma 2; cuDNN has none, so a capped layer runs `xla` on
the GPU) and the score `scale` (default head_dim ** -0.5).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def default_impl() -> str:
  platform = jax.devices()[0].platform
  return {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")


def resolve_impl(name: str, dtype: str = "bfloat16") -> str:
  """`auto` -> the platform's kernel; cuDNN flash attention needs bf16/fp16 compute."""
  if name != "auto":
    return name
  impl = default_impl()
  return "xla" if impl == "cudnn" and dtype == "float32" else impl


class Options(NamedTuple):
  """What a layer's attention does beyond causal and same-segment masking."""
  window: int = 0         # > 0: a query sees the `window` positions ending at its own
  softcap: float = 0.0    # > 0: scores become softcap * tanh(score / softcap)
  scale: float = 0.0      # > 0: scores are q.k * scale; 0: q.k / sqrt(head_dim)

  def score_scale(self, head_dim: int) -> float:
    return self.scale if self.scale > 0 else 1.0 / float(np.sqrt(head_dim))


PLAIN = Options()


def mask_BTS(segment_ids_BT: jax.Array | None, T: int, S: int, window: int = 0) -> jax.Array:
  """Causal (and same-segment, when given; within `window`, when > 0) boolean mask of
  shape [B or 1, T, S]."""
  gap_TS = jnp.arange(T)[:, None] - jnp.arange(S)[None, :]
  causal_TS = gap_TS >= 0
  if window:
    causal_TS = causal_TS & (gap_TS < window)
  if segment_ids_BT is None:
    return causal_TS[None]
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return causal_TS[None] & same_BTS


def _scores(q_BTHK, k, options: Options, kv: str = "bsgk"):
  """Scaled (and capped) float32 scores [B, G, R, T, S], R query heads per kv head; `kv`
  the keys' axes (bsgk, or bgsk: a decoding cache)."""
  B, T, H, K = q_BTHK.shape
  G = k.shape[kv.index("g")]
  q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
  logits_BGRTS = jnp.einsum(f"btgrk,{kv}->bgrts", q_BTGRK, k,
                            preferred_element_type=jnp.float32)
  if options.scale > 0:
    logits_BGRTS = logits_BGRTS * options.scale
  else:
    logits_BGRTS = logits_BGRTS / np.sqrt(K)
  if options.softcap > 0:
    logits_BGRTS = options.softcap * jnp.tanh(logits_BGRTS / options.softcap)
  return logits_BGRTS


def _weighted(logits_BGRTS, mask_BTS, v, shape, kv: str = "bsgk"):
  logits_BGRTS = jnp.where(mask_BTS[:, None, None], logits_BGRTS, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_BGRTS, axis=-1).astype(v.dtype)
  out_BTGRK = jnp.einsum(f"bgrts,{kv}->btgrk", probs, v)
  return out_BTGRK.reshape(shape)


def xla_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, options: Options = PLAIN):
  mask = mask_BTS(segment_ids_BT, q_BTHK.shape[1], k_BSGK.shape[1], options.window)
  return _weighted(_scores(q_BTHK, k_BSGK, options), mask, v_BSGK, q_BTHK.shape)


def cached_attention(q_BTHK, k_BGSK, v_BGSK, key_valid_BS, q_slots_T,
                     options: Options = PLAIN):
  """Decoding attention over a KV cache (jaxlm.model.Cache: slots after kv heads): query
  t (at cache slot q_slots_T[t]) sees the valid slots at or before its own (and, with a
  window, fewer than `window` slots back: a row's tokens sit in consecutive slots, so
  slot distance is position distance). The same arithmetic as `xla_attention`. One
  query a row (a decode step) may sit in a ring of slots (jaxlm.generate's rows): every
  valid slot is its own or an earlier token's, and a slot's distance back is counted
  modulo S."""
  S = k_BGSK.shape[2]
  gap_TS = q_slots_T[:, None] - jnp.arange(S)[None, :]
  if q_BTHK.shape[1] == 1:
    gap_TS = gap_TS % S
  seen_TS = (gap_TS >= 0) & (gap_TS < options.window) if options.window else gap_TS >= 0
  mask = seen_TS[None] & key_valid_BS[:, None, :]
  return _weighted(_scores(q_BTHK, k_BGSK, options, "bgsk"), mask, v_BGSK, q_BTHK.shape,
                   "bgsk")


# cuDNN kernels by row layout, the cheapest that fits the whole batch (jaxlm.bench, H200,
# 2026-12-01): every row one segment -> plain causal; one segment then padding (DPO,
# unpacked rows) -> causal with per-row lengths; several segments (packing) -> ragged
# segments, given as offsets and lengths with room for a fixed number of runs a row
# (its backward's preprocessing costs grow with that room, so the smallest that fits is
# taken); more runs than the largest room -> an explicit mask, 2.2x slower than causal.
# Each layout also serves every batch an earlier one serves.
SEGMENT_CAPACITIES = (8, 64)
LAYOUTS = ("causal", "padded", *(f"ragged{c}" for c in SEGMENT_CAPACITIES), "mask")

# The layout the batch being traced has, when its caller knows it (the training loop
# reads it from the host batch and compiles one step per layout it meets); None: chosen
# on the device, per batch, by `lax.switch`.
_LAYOUT: contextvars.ContextVar[str | None] = contextvars.ContextVar("layout", default=None)


@contextlib.contextmanager
def fixed_layout(name: str | None):
  """Within: cuDNN attention traces only the kernel for layout `name` (one of LAYOUTS)."""
  if name is not None and name not in LAYOUTS:
    raise ValueError(f"unknown attention layout {name!r}; one of {LAYOUTS}")
  token = _LAYOUT.set(name)
  try:
    yield
  finally:
    _LAYOUT.reset(token)


def _run_starts(seg, xp):
  prev = xp.concatenate([xp.full_like(seg[..., :1], -1), seg[..., :-1]], axis=-1)
  return seg != prev


def layout_index(segment_ids, xp=jnp):
  """Index into LAYOUTS of the cheapest cuDNN kernel for segment ids [..., T]; with
  `xp=np` on a host batch, as the training loop does."""
  seg = segment_ids.reshape(-1, segment_ids.shape[-1])
  real = seg != 0
  runs = xp.sum(_run_starts(seg, xp), axis=1)  # runs of equal ids a row, padding's included
  single = xp.all((runs == 1) & real[:, 0])
  one_then_pad = xp.all(real[:, 0] & ((runs == 1) | ((runs == 2) & ~real[:, -1])))
  too_many = sum((xp.max(runs) > c).astype(xp.int32) for c in SEGMENT_CAPACITIES)
  return xp.where(single, 0, xp.where(one_then_pad, 1, 2 + too_many))


def batch_layout(segment_ids) -> str:
  """The name of the cheapest cuDNN kernel for a host batch's segment ids."""
  return LAYOUTS[int(layout_index(np.asarray(segment_ids), np))]


def segment_runs(segment_ids_BT, max_segments: int):
  """Each row's runs of equal segment ids (padding, id 0, makes runs too: it attends to
  itself, as in `mask_BTS`), in cuDNN's packed layout: lengths [B, M] and start offsets
  [B, M + 1] (-1 past a row's last run), and the number of runs per row [B]."""
  starts = _run_starts(segment_ids_BT, jnp)
  run = jnp.cumsum(starts, axis=1) - 1                        # run index of each token
  one_hot = run[..., None] == jnp.arange(max_segments)        # [B, T, M]
  lengths = jnp.sum(one_hot, axis=1, dtype=jnp.int32)
  first = jnp.argmax(one_hot, axis=1).astype(jnp.int32)
  count = jnp.sum(starts, axis=1, dtype=jnp.int32)
  present = jnp.arange(max_segments)[None] < count[:, None]
  lengths = jnp.where(present, lengths, -1)
  offsets = jnp.pad(jnp.where(present, first, -1), ((0, 0), (0, 1)), constant_values=-1)
  return lengths, offsets, count


def saveable(prim, *_, **__) -> bool:
  """A remat policy: keep cuDNN flash attention's forward outputs (the output and the
  softmax statistics, which its backward kernel reads). Otherwise the backward pass runs
  the forward kernel again: 7% of the TinyLlama 1.1B step on an H200, for 1.4 GiB kept."""
  return prim.name == "dot_product_attention_fwd_wrapper"  # jax._src.cudnn's primitive


def _packed_supported() -> bool:
  d = jax.devices()[0]
  return float(getattr(d, "compute_capability", "0") or 0) >= 9.0  # cuDNN: Hopper and later


def cudnn_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, options: Options = PLAIN):
  scale = options.score_scale(q_BTHK.shape[-1])
  window = (options.window - 1, 0) if options.window else None

  def causal(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                        local_window_size=window, implementation="cudnn")

  def mask(q, k, v):
    m = mask_BTS(segment_ids_BT, q.shape[1], k.shape[1], options.window)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale, implementation="cudnn")

  if segment_ids_BT is None:
    return causal(q_BTHK, k_BSGK, v_BSGK)
  if not _packed_supported() or q_BTHK.shape[1] != k_BSGK.shape[1]:
    return mask(q_BTHK, k_BSGK, v_BSGK)
  # jax.nn.dot_product_attention takes no segment ids; its cuDNN backend does.
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # lazy: GPU only
  seg = segment_ids_BT
  real = seg != 0

  def padded(q, k, v):  # rows of one segment, then padding (zeros: its loss is masked)
    length_B = jnp.sum(real, axis=1, dtype=jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=length_B,
                                       key_value_seq_lengths=length_B, scale=scale,
                                       local_window_size=window, implementation="cudnn")
    return jnp.where(real[:, :, None, None], out, 0).astype(q.dtype)

  def ragged(capacity):
    def run(q, k, v):
      lengths, offsets, _ = segment_runs(seg, capacity)
      return cudnn.dot_product_attention(
          q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
          kv_offsets=offsets, scale=scale, mask_type=cudnn.MaskType.PADDING_CAUSAL)
    # A window over packed segments: the explicit mask (the ragged kernel's window is
    # not checked here against the reference).
    return mask if options.window else run

  kernels = (causal, padded, *map(ragged, SEGMENT_CAPACITIES), mask)
  fixed = _LAYOUT.get()
  if fixed is not None:
    return kernels[LAYOUTS.index(fixed)](q_BTHK, k_BSGK, v_BSGK)
  # Chosen on the device: every branch's residuals are kept for the backward pass, which
  # costs memory (at 1.1B far more than one layout's program holds).
  return jax.lax.switch(layout_index(seg), kernels, q_BTHK, k_BSGK, v_BSGK)


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, T: int, interpret: bool, window: int = 0,
                   softcap: float = 0.0):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # lazy: TPU only
  sk, sm = splash.splash_attention_kernel, splash.splash_attention_mask
  one = (sm.LocalMask((T, T), window_size=(window - 1, 0), offset=0) if window
         else sm.CausalMask((T, T)))
  mask = sm.MultiHeadMask([one for _ in range(num_heads)])
  block = min(512, T)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            attn_logits_soft_cap=softcap or None, interpret=interpret)


def splash_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, interpret=False,
                     options: Options = PLAIN):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # lazy: TPU only
  sk = splash.splash_attention_kernel
  B, T, H, K = q_BTHK.shape
  G = k_BSGK.shape[2]
  kernel = _splash_kernel(H, T, interpret, options.window, options.softcap)
  if options.scale > 0:
    q_BHTK = jnp.swapaxes(q_BTHK, 1, 2) * np.asarray(options.scale, q_BTHK.dtype)
  else:
    q_BHTK = jnp.swapaxes(q_BTHK, 1, 2) / np.sqrt(K).astype(q_BTHK.dtype)
  k_BHSK = jnp.repeat(jnp.swapaxes(k_BSGK, 1, 2), H // G, axis=1)
  v_BHSK = jnp.repeat(jnp.swapaxes(v_BSGK, 1, 2), H // G, axis=1)
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((B, T), jnp.int32)
  seg = sk.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
  out_BHTK = jax.vmap(kernel)(q_BHTK, k_BHSK, v_BHSK, segment_ids=seg)
  return jnp.swapaxes(out_BHTK, 1, 2)


def attend(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, impl: str = "xla",
           options: Options = PLAIN):
  """Causal grouped-query attention; `impl` in xla | cudnn | splash | splash_interpret."""
  if impl == "xla" or (impl == "cudnn" and options.softcap > 0):  # cuDNN: no softcap
    return xla_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, options)
  if impl == "cudnn":
    return cudnn_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, options)
  if impl in ("splash", "splash_interpret"):
    return splash_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT,
                            interpret=impl == "splash_interpret", options=options)
  raise ValueError(f"unknown attention implementation {impl!r}")
