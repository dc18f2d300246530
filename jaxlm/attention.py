"""Causal attention with packed-sequence masking, one interface over three kernels.

    attend(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, impl) -> out_BTHK

`xla` is the reference and runs everywhere; `cudnn` is cuDNN flash attention on NVIDIA
GPUs through `jax.nn.dot_product_attention`; `splash` is the Pallas TPU kernel.
Tokens attend only to earlier tokens of the same segment (segment 0 is padding).
"""

from __future__ import annotations

import functools

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


def mask_BTS(segment_ids_BT: jax.Array | None, T: int, S: int) -> jax.Array:
  """Causal (and same-segment, when given) boolean mask of shape [B or 1, T, S]."""
  causal_TS = jnp.arange(T)[:, None] >= jnp.arange(S)[None, :]
  if segment_ids_BT is None:
    return causal_TS[None]
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return causal_TS[None] & same_BTS


def xla_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None):
  B, T, H, K = q_BTHK.shape
  G = k_BSGK.shape[2]
  q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
  logits_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK,
                            preferred_element_type=jnp.float32) / np.sqrt(K)
  mask = mask_BTS(segment_ids_BT, T, k_BSGK.shape[1])[:, None, None]
  logits_BGRTS = jnp.where(mask, logits_BGRTS, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_BGRTS, axis=-1).astype(v_BSGK.dtype)
  out_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BSGK)
  return out_BTGRK.reshape(B, T, H, K)


def cached_attention(q_BTHK, k_BSGK, v_BSGK, key_valid_BS, q_slots_T):
  """Decoding attention over a KV cache: query t (at cache slot q_slots_T[t]) sees the
  valid slots at or before its own. The same arithmetic as `xla_attention`."""
  B, T, H, K = q_BTHK.shape
  G, S = k_BSGK.shape[2], k_BSGK.shape[1]
  q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
  logits_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK,
                            preferred_element_type=jnp.float32) / np.sqrt(K)
  mask_BTS = (jnp.arange(S)[None, None, :] <= q_slots_T[None, :, None]) & key_valid_BS[:, None, :]
  logits_BGRTS = jnp.where(mask_BTS[:, None, None], logits_BGRTS, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_BGRTS, axis=-1).astype(v_BSGK.dtype)
  out_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", probs, v_BSGK)
  return out_BTGRK.reshape(B, T, H, K)


def cudnn_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None):
  if segment_ids_BT is None:
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, is_causal=True,
                                        implementation="cudnn")
  mask = mask_BTS(segment_ids_BT, q_BTHK.shape[1], k_BSGK.shape[1])[:, None]
  return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask,
                                      implementation="cudnn")


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, T: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(num_heads)])
  block = min(512, T)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def splash_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, interpret=False):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  B, T, H, K = q_BTHK.shape
  G = k_BSGK.shape[2]
  kernel = _splash_kernel(H, T, interpret)
  q_BHTK = jnp.swapaxes(q_BTHK, 1, 2) / np.sqrt(K).astype(q_BTHK.dtype)
  k_BHSK = jnp.repeat(jnp.swapaxes(k_BSGK, 1, 2), H // G, axis=1)
  v_BHSK = jnp.repeat(jnp.swapaxes(v_BSGK, 1, 2), H // G, axis=1)
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((B, T), jnp.int32)
  seg = sk.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
  out_BHTK = jax.vmap(kernel)(q_BHTK, k_BHSK, v_BHSK, segment_ids=seg)
  return jnp.swapaxes(out_BHTK, 1, 2)


def attend(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, impl: str = "xla"):
  """Causal grouped-query attention; `impl` in xla | cudnn | splash | splash_interpret."""
  if impl == "xla":
    return xla_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT)
  if impl == "cudnn":
    return cudnn_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT)
  if impl in ("splash", "splash_interpret"):
    return splash_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT,
                            interpret=impl == "splash_interpret")
  raise ValueError(f"unknown attention implementation {impl!r}")
