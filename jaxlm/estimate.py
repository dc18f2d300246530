"""What a training run costs before it starts: FLOPs, accelerator-hours, dollars, memory.

    cfg = preset_model("llama3_8b")
    r = estimate(cfg, tokens=15e12, hardware="h100", mfu=0.40, seq_len=8192)
    print(format_text(r))

FLOPs per token are jaxlm.model.flops_per_token (PaLM-style 6N + 12*L*H*K*T, where N
counts the weights used in matmuls); `total_flops_6nd` is the simpler 6*N*D with N
every parameter, the figure most papers quote. Accelerator-hours are total FLOPs over
peak FLOP/s x MFU. Prices in HARDWARE are list-price-like on-demand defaults, there to
be replaced with your own (`price=`, `--price`).

Memory per device is an estimate of the steady state of a training step: parameters,
gradients and AdamW moments sharded over fsdp x tensor (replicated over data), plus the
activations the remat policy keeps for the backward pass and the float32 logits. It
leaves out XLA's temporaries and fragmentation, attention scores (a fused attention
kernel is assumed), the runtime's own reserve and communication buffers, so treat a
"fits" near 100% as "does not fit". Check it against a measured peak: the peak memory
column of README's benchmark table (from benchmarks/issue21_h200) for the same preset
and batch. The measured peak runs above the estimate, more so with the layers unrolled
(`model.layer_loop`), whose program keeps more buffers live.

Importing this module does not import jax; the functions that count parameters or
FLOPs import jaxlm.model (and so jax) when first called. No device is needed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping

import jax
import ml_collections

from jaxlm import model
from jaxlm.config import MESH_AXES, MODEL_PRESETS, load_module, model_config
from jaxlm.errors import EstimateError


GIB = 1024 ** 3
HOURS_PER_YEAR = 8766.0  # 365.25 days
REMAT_POLICIES = ("none", "minimal", "full")
DEFAULT_SEQ_LEN = 2048


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One accelerator: dense bf16 peak, memory, and a default price per device-hour."""
  name: str
  peak_tflops: float     # dense (no sparsity) bf16 peak, TFLOP/s per device
  memory_gb: float       # HBM per device as sold; the fit check reads it as GiB (within ~1%)
  price_per_hour: float  # USD per device-hour: a list-price-like default, replace with yours
  note: str = ""


# Peaks from the vendors' data sheets (as jaxlm.metrics.PEAK_TFLOPS). The prices are
# rough on-demand list-price-like defaults, not quotes: pass your own with --price.
HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    Hardware("h100", 989.0, 80.0, 3.00, "NVIDIA H100 SXM"),
    Hardware("h200", 989.0, 141.0, 3.80, "NVIDIA H200 SXM"),
    Hardware("a100", 312.0, 80.0, 1.80, "NVIDIA A100 SXM 80GB"),
    Hardware("v100", 125.0, 32.0, 0.90, "NVIDIA V100 SXM2 32GB, fp16 tensor cores"),
    Hardware("tpu-v5p", 459.0, 95.0, 4.20, "Google TPU v5p chip"),
    Hardware("tpu-v5e", 197.0, 16.0, 1.20, "Google TPU v5e chip"),
    Hardware("tpu-v6e", 918.0, 32.0, 2.70, "Google TPU v6e (Trillium) chip"),
)}


def _reference(**overrides) -> ml_collections.ConfigDict:
  return model_config("tiny", **overrides)


# Public reference models, for estimates only (too large to be training presets).
REFERENCE_SHAPES: dict[str, ml_collections.ConfigDict] = {
    # Llama 3.1 405B (Meta, 2024): GQA with 8 kv heads, 128k vocabulary.
    "llama3_405b": _reference(d_model=16384, num_layers=126, num_heads=128, num_kv_heads=8,
                              ffn_dim=53248, vocab_size=128256, rope_theta=500000.0),
    # GPT-3 175B (Brown et al., 2020): GPT-2 architecture, tied embeddings, 2048 positions.
    "gpt3_175b": _reference(family="gpt2", d_model=12288, num_layers=96, num_heads=96,
                            num_kv_heads=96, ffn_dim=49152, vocab_size=50257,
                            tie_embeddings=True, max_seq_len=2048, norm_eps=1e-5),
}
# The sequence length each reference model was (mostly) trained at.
REFERENCE_SEQ_LEN = {"llama3_405b": 8192, "gpt3_175b": 2048}


def model_names() -> list[str]:
  return [*MODEL_PRESETS, *REFERENCE_SHAPES]


def preset_model(name: str) -> ml_collections.ConfigDict:
  """The model section of a jaxlm.config preset or a REFERENCE_SHAPES entry (a copy)."""
  if name in MODEL_PRESETS:
    return model_config(name)
  if name in REFERENCE_SHAPES:
    return ml_collections.ConfigDict(REFERENCE_SHAPES[name].to_dict())
  raise EstimateError(f"unknown model {name!r}: must be one of {', '.join(model_names())}")


def default_seq_len(name: str, cfg) -> int:
  """A preset's usual sequence length: the reference's, gpt2's position table, or 2048."""
  if name in REFERENCE_SEQ_LEN:
    return REFERENCE_SEQ_LEN[name]
  if cfg.family == "gpt2":
    return int(cfg.max_seq_len)
  return DEFAULT_SEQ_LEN


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`FILE[:ARG]` -> FILE's get_config(ARG), as `--config FILE[:ARG]` does for the launcher."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise EstimateError(f"no such file {path!r}")
  try:
    module = load_module(path, "_jaxlm_estimate_config")
  except Exception as e:  # pylint: disable=broad-except
    raise EstimateError(f"{path}: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise EstimateError(f"{path} has no get_config()")
  try:
    return module.get_config(arg) if arg else module.get_config()
  except ValueError as e:  # jaxlm.config.ConfigError for a bad ARG
    raise EstimateError(str(e)) from e


_SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_tokens(text: str | float) -> float:
  """`15.6e12`, `300e9`, `15.6T`, `300B`, `2M`, `500K` -> a token count (> 0)."""
  if isinstance(text, (int, float)):
    value = float(text)
  else:
    m = re.fullmatch(r"\s*([0-9][0-9_]*\.?[0-9]*(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*",
                     str(text))
    if not m:
      raise EstimateError(f"{text!r} is not a count: give e.g. 15.6e12, 15.6T, 300B, 2M")
    value = float(m.group(1).replace("_", "")) * _SUFFIXES[m.group(2).upper()]
  if not value > 0 or math.isinf(value):
    raise EstimateError(f"{text!r}: must be > 0")
  whole = float(round(value))
  return whole if abs(value - whole) <= 1e-12 * value else value  # 15.6 * 1e12 is 15.6e12


def parse_mfu(value: float | str) -> float:
  """MFU as a fraction: 0.4 stays 0.4; values over 1 are percent (40 -> 0.4)."""
  try:
    mfu = float(value)
  except ValueError as e:
    raise EstimateError(f"{value!r} is not a number") from e
  if not 0 < mfu <= 100:
    raise EstimateError(f"{value!r}: must be in (0, 1] as a fraction or (1, 100] as percent")
  return mfu / 100 if mfu > 1 else mfu


def parse_mesh(text: str) -> dict[str, int]:
  """`data=2,fsdp=64,tensor=8` -> sizes; unnamed axes default to data=1, fsdp=-1, tensor=1."""
  sizes = {"data": 1, "fsdp": -1, "tensor": 1}
  named = set()
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in MESH_AXES:
      raise EstimateError(f"{item!r}: expected AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}")
    try:
      sizes[key] = int(value)
    except ValueError as e:
      raise EstimateError(f"{item!r}: the size must be an integer") from e
    if sizes[key] == 0 or sizes[key] < -1:
      raise EstimateError(f"{item!r}: the size must be >= 1 (or -1: the remaining devices)")
    named.add(key)
  if "fsdp" not in named and any(sizes[a] == -1 for a in ("data", "tensor")):
    sizes["fsdp"] = 1
  return sizes


def resolve_mesh(sizes: Mapping[str, int], devices: int | None) -> tuple[dict[str, int], int]:
  """(data, fsdp, tensor) sizes and the device count. One axis may be -1: it takes the
  devices the others leave (1 when `devices` is None)."""
  shape = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
  if list(shape.values()).count(-1) > 1:
    raise EstimateError("only one mesh axis may be -1")
  known = math.prod(s for s in shape.values() if s != -1)
  if devices is not None and devices < 1:
    raise EstimateError(f"{devices} devices: must be >= 1")
  for axis, size in shape.items():
    if size == -1:
      if devices is None:
        shape[axis] = 1
      elif devices % known:
        raise EstimateError(f"the fixed mesh axes ({known} devices) do not divide the "
                            f"{devices} devices")
      else:
        shape[axis] = devices // known
  total = math.prod(shape.values())
  if devices is not None and total != devices:
    raise EstimateError("data*fsdp*tensor = " + "*".join(str(shape[a]) for a in MESH_AXES)
                        + f" = {total}, but there are {devices} devices")
  return shape, total


def _leaf_shapes(tree) -> list[tuple[int, ...]]:
  if isinstance(tree, dict):
    return [s for v in tree.values() for s in _leaf_shapes(v)]
  return [tree[0]]  # (shape, logical axes)


def count_params(cfg) -> int:
  """Every parameter of the model, as jaxlm.model.init would make them."""
  return sum(math.prod(s) for s in _leaf_shapes(model.param_shapes_and_axes(cfg)))


def flops_per_token(cfg, seq_len: int) -> float:
  return float(model.flops_per_token(cfg, seq_len))


_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def activation_bytes_per_token_layer(cfg, remat: str) -> float:
  """Bytes one layer keeps per token for the backward pass under `remat`, unsharded.

  full: the layer input (bf16). minimal: that plus the projection outputs saved by name
  (q, k, v, the attention output projection, gate (llama), up, down; bf16) and cuDNN
  attention's forward outputs (its output, bf16, and softmax statistics, float32, one per
  head; kept on GPUs, counted everywhere). none: minimal
  plus the elementwise intermediates, approximated as the ffn activations again
  (2 * ffn * 2 bytes) and the two norms' outputs in float32 (2 * d * 4 bytes).
  """
  if remat not in REMAT_POLICIES:
    raise EstimateError(f"remat {remat!r}: must be one of {', '.join(REMAT_POLICIES)}")
  d, f = cfg.d_model, cfg.ffn_dim
  k = cfg.head_dim or cfg.d_model // cfg.num_heads
  layer_input = d * 2
  if remat == "full":
    return layer_input
  gates = 1 if cfg.family == "gpt2" else 2  # up only, or gate and up
  projections = (cfg.num_heads * k + 2 * cfg.num_kv_heads * k + d + gates * f + d) * 2
  attention_outputs = cfg.num_heads * (k * 2 + 4)
  minimal = layer_input + projections + attention_outputs
  if remat == "minimal":
    return minimal
  return minimal + 2 * f * 2 + 2 * d * 4


def memory(cfg, *, n_params: int, mesh: Mapping[str, int], batch: int | None, seq_len: int,
           remat: str, grad_accum: int = 1) -> dict[str, Any]:
  """Memory per device in GiB: params, grads, optimizer (and activations, logits when the
  global `batch` is known) and their total, plus notes on what was assumed."""
  if cfg.param_dtype not in _BYTES:
    raise EstimateError(f"model.param_dtype {cfg.param_dtype!r}: must be one of "
                        f"{', '.join(_BYTES)}")
  shards = mesh["fsdp"] * mesh["tensor"]
  p_bytes = _BYTES[cfg.param_dtype]
  out = {"params": n_params * p_bytes / shards / GIB,
         "grads": n_params * p_bytes / shards / GIB,           # same dtype as the params
         "optimizer": n_params * 2 * 4 / shards / GIB}         # AdamW: two float32 moments
  notes = []
  if batch:
    data_parallel = mesh["data"] * mesh["fsdp"]
    per_device = batch / max(grad_accum, 1) / data_parallel
    rows = math.ceil(per_device)
    if rows != per_device:
      notes.append(f"batch {batch} (grad_accum {grad_accum}) over data*fsdp={data_parallel} is "
                   f"uneven; the busiest device holds {rows} row(s)")
    tokens = rows * seq_len
    per_token = cfg.num_layers * activation_bytes_per_token_layer(cfg, remat)
    out["activations"] = tokens * per_token / mesh["tensor"] / GIB
    chunk = cfg.logits_chunk
    positions = chunk if 0 < chunk < seq_len else seq_len
    out["logits"] = rows * positions * cfg.vocab_size * 4 / mesh["tensor"] / GIB
  else:
    notes.append("activations and logits not estimated: give a batch size")
  out["total"] = sum(out.values())
  return {"gib": out, "notes": notes}


def estimate(cfg, *, tokens: float, hardware: str, mfu: float, seq_len: int,
             price: float | None = None, devices: int | None = None,
             batch: int | None = None, mesh: Mapping[str, int] | None = None,
             remat: str | None = None, grad_accum: int = 1, name: str = "") -> dict[str, Any]:
  """The whole estimate as a JSON-able dict.

  `cfg` is a model section (jaxlm.config.model_config); `tokens` the training tokens;
  `mfu` a fraction; `devices` the device count (None: unknown, no wall-clock time; the
  mesh and step time then assume the mesh's fixed size, 1 by default); `batch` the global
  batch in sequences (None: no step time, no activation memory); `mesh` axis sizes, one
  may be -1 (default: every device on fsdp).
  """
  if hardware not in HARDWARE:
    raise EstimateError(f"unknown hardware {hardware!r}: must be one of {', '.join(HARDWARE)}")
  hw = HARDWARE[hardware]
  if not 0 < mfu <= 1:
    raise EstimateError(f"mfu {mfu}: must be in (0, 1]")
  if price is not None and price < 0:
    raise EstimateError(f"price {price}: must be >= 0")
  if seq_len < 1:
    raise EstimateError(f"seq_len {seq_len}: must be >= 1")
  if batch is not None and batch < 1:
    raise EstimateError(f"batch {batch}: must be >= 1")
  if cfg.vocab_size <= 0:
    raise EstimateError("model.vocab_size is 0 (the tokenizer's size): give the vocabulary size")
  remat = remat or cfg.remat
  shape, n_devices = resolve_mesh(mesh or {"data": 1, "fsdp": -1, "tensor": 1}, devices)

  n_params = count_params(cfg)
  fpt = flops_per_token(cfg, seq_len)
  total = fpt * tokens
  sustained = hw.peak_tflops * 1e12 * mfu  # FLOP/s per device
  hours = total / sustained / 3600
  rate = hw.price_per_hour if price is None else price
  mem = memory(cfg, n_params=n_params, mesh=shape, batch=batch, seq_len=seq_len, remat=remat,
               grad_accum=grad_accum)
  notes = list(mem["notes"])
  if cfg.family == "gpt2" and seq_len > cfg.max_seq_len:
    notes.append(f"seq_len {seq_len} exceeds the gpt2 position table "
                 f"(model.max_seq_len={cfg.max_seq_len})")
  r = {
      "model": name,
      "family": cfg.family,
      "params": n_params,
      "seq_len": seq_len,
      "tokens": int(tokens) if float(tokens).is_integer() else tokens,
      "flops_per_token": fpt,
      "total_flops": total,
      "total_flops_6nd": 6.0 * n_params * tokens,
      "hardware": hw.name,
      "peak_tflops": hw.peak_tflops,
      "mfu": mfu,
      "sustained_tflops": sustained / 1e12,
      "accelerator_hours": hours,
      "accelerator_years": hours / HOURS_PER_YEAR,
      "price_per_hour": rate,
      "price_is_default": price is None,
      "cost_usd": hours * rate,
      "devices": n_devices,
      "mesh": shape,
      "remat": remat,
      "batch": batch,
      "grad_accum": grad_accum,
      "memory_gib": mem["gib"],
      "memory_capacity_gib": hw.memory_gb,
      "memory_fraction": mem["gib"]["total"] / hw.memory_gb,
      "fits": mem["gib"]["total"] <= hw.memory_gb,
      "notes": notes,
  }
  if batch:
    tokens_per_step = batch * seq_len
    r["tokens_per_step"] = tokens_per_step
    r["steps"] = math.ceil(tokens / tokens_per_step)
    r["step_time_s"] = tokens_per_step * fpt / (n_devices * sustained)
  if devices is not None:
    r["wall_days"] = hours / n_devices / 24
  return r


def human(x: float, digits: int = 3) -> str:
  """1.56e13 -> '15.6T'; plain below a thousand."""
  for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
    if abs(x) >= div:
      return f"{x / div:.{digits}g}{suffix}"
  return f"{x:.{digits}g}"


def _amount(x: float) -> str:
  """3280.7 -> '3,281'; 0.5208 -> '0.521'."""
  return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def format_text(r: Mapping[str, Any]) -> str:
  """A readable table of an `estimate` result."""
  hw = HARDWARE[r["hardware"]]
  price_note = ("default list-price-like, override with --price" if r["price_is_default"]
                else "given")
  mesh = r["mesh"]
  rows = [
      ("model", f"{r['model'] or '?'} ({r['family']}, {human(r['params'])} parameters)"),
      ("tokens", f"{human(r['tokens'])} ({r['tokens']:.4g}), seq_len {r['seq_len']}"),
      ("FLOPs per token", f"{r['flops_per_token']:.4g} (PaLM-style 6N + 12*L*H*K*T)"),
      ("total FLOPs", f"{r['total_flops']:.4g}"),
      ("total FLOPs, 6ND", f"{r['total_flops_6nd']:.4g}"),
      ("hardware", f"{hw.name}: {hw.note}; {hw.peak_tflops:g} TFLOP/s dense 16-bit peak, "
                   f"{hw.memory_gb:g} GB"),
      ("MFU", f"{100 * r['mfu']:.3g}% -> {r['sustained_tflops']:.4g} TFLOP/s per device"),
      ("accelerator-hours", f"{human(r['accelerator_hours'], 4)} "
                            f"({_amount(r['accelerator_years'])} accelerator-years)"),
      ("price", f"${r['price_per_hour']:.2f} per device-hour ({price_note})"),
      ("cost", f"${human(r['cost_usd'], 4)}"
               + (f" (${r['cost_usd']:,.0f})" if r["cost_usd"] >= 1e3 else "")),
  ]
  if "wall_days" in r:
    rows.append(("wall clock", f"{_amount(r['wall_days'])} days on {r['devices']} devices"))
  if "step_time_s" in r:
    rows.append(("step", f"{r['batch']} x {r['seq_len']} = {human(r['tokens_per_step'])} "
                         f"tokens, {r['step_time_s']:.4g} s on {r['devices']} device(s), "
                         f"{human(r['steps'])} steps"))
  rows.append(("memory per device", f"mesh data={mesh['data']} fsdp={mesh['fsdp']} "
                                    f"tensor={mesh['tensor']}, remat {r['remat']} (estimate)"))
  for key, value in r["memory_gib"].items():
    rows.append((f"  {key}", f"{value:,.2f} GiB"))
  fits = "fits" if r["fits"] else "does NOT fit"
  rows.append(("  capacity", f"{r['memory_capacity_gib']:g} GiB: {fits} "
                             f"({100 * r['memory_fraction']:.0f}%)"))
  width = max(len(k) for k, _ in rows)
  lines = [f"{k:<{width}}  {v}" for k, v in rows]
  lines += [f"note: {n}" for n in r["notes"]]
  return "\n".join(lines)


def device_memory_bytes() -> int | None:
  """What one local device can hold: its allocator's limit (GPU, TPU), or on the CPU the
  host's physical memory shared by its local devices; None when unknown."""
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends differ; some do not tell)
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    try:
      total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
      return None
    return total // max(jax.local_device_count(), 1)
  return None


def memory_errors(config, mesh: Mapping[str, int], limit: int | None) -> list[str]:
  """One line when the estimator's memory per device for this training config exceeds
  `limit` bytes: the run could only fail, after its data was read and its state was
  allocated. The estimate leaves out XLA's temporaries, so it is a floor."""
  if not limit or config.task not in ("pretrain", "sft", "dpo", "reward"):
    return []
  if config.init_from or config.lora.rank > 0:  # the shape comes later; the estimator
    return []                                  # counts every weight as trained
  cfg = ml_collections.ConfigDict(config.model.to_dict())
  if not cfg.vocab_size:  # taken from the tokenizer later: the size it will have at least
    cfg.vocab_size = config.data.tokenizer_vocab_size
  rows = config.data.batch_size * (2 if config.task in ("dpo", "reward") else 1)
  try:
    n_params = count_params(cfg)
    m = memory(cfg, n_params=n_params, mesh=mesh, batch=rows, seq_len=config.data.seq_len,
               remat=cfg.remat, grad_accum=config.optimizer.grad_accum_steps)
  except (EstimateError, ValueError, KeyError, TypeError):
    return []  # a shape the estimator does not model: XLA's own error stays the check
  need = m["gib"]["total"] * GIB
  if need <= limit:
    return []
  return [f"data.seq_len={config.data.seq_len}, data.batch_size={config.data.batch_size}: "
          f"the estimated {need / GIB:,.1f} GiB per device (tools/estimate.py; params, "
          f"gradients, optimizer, activations, logits) exceed the {limit / GIB:,.1f} GiB one "
          f"device holds; lower them, raise optimizer.grad_accum_steps or model.remat, or "
          f"shard over more devices"]
