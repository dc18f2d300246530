"""How fast the launcher's own steps run: training steps and the decode engine, timed on
synthetic tokens (tools/bench.py is the command line).

    result = bench.run(bench.Spec(preset="tinyllama_1b", task="pretrain"))

Each task builds its real step: the pretraining and SFT loss (jaxlm.tasks.pretrain), the
DPO loss with its reference (jaxlm.tasks.dpo), through the shared loop's sharded,
donated, jitted train step (jaxlm.loop.setup); `decode` runs jaxlm.generate.Engine. The
tokens are random ids in the layouts the data pipeline makes: one document a row for
pretraining, whole examples packed first-fit with the prompt masked for SFT (the real
packer, jaxlm.data.sft.sft_dataset), chosen/rejected pairs padded to the row for DPO
(jaxlm.data.preference.pad_group).

Timing follows what MaxText and torchtitan publish: compile apart, warm-up steps
dropped, then each timed step run to completion and the median reported; several
different batches placed on the device beforehand, used in turn. Tokens/s counts every
position of every row (padding included: the step computes it). MFU is PaLM-style
(jaxlm.model.flops_per_token) over the device's dense bf16 peak (jaxlm.metrics).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import attention, console, generate, loop, metrics as metrics_lib, model
from jaxlm.cli import apply_override
from jaxlm.config import base_config, frozen_model, model_config
from jaxlm.data import preference, sft
from jaxlm.errors import ConfigError
from jaxlm.tasks import common, dpo
from jaxlm.validate import config_errors as validate


TASKS = ("pretrain", "sft", "dpo", "decode")

# Rows x length per preset when --batch / --seq are not given (training; issue 8's shapes).
DEFAULT_SHAPES = {"tiny": (8, 128), "llama_150m": (16, 2048), "tinyllama_1b": (8, 2048),
                  "llama3_3b": (4, 2048), "llama3_8b": (2, 2048), "gpt2_small": (16, 1024),
                  "qwen3_1_7b": (8, 2048), "gemma2_2b": (8, 2048), "gemma3_1b": (8, 2048)}
TINY_VOCAB = 4096  # presets without a vocabulary size (tiny) take this one


@dataclasses.dataclass
class Spec:
  preset: str = "tiny"
  task: str = "pretrain"
  batch: int = 0            # rows a step (DPO: sequences, i.e. 2 x records); decode: prompts
  seq: int = 0              # row length; decode: prompt length
  new_tokens: int = 256     # decode: tokens generated per prompt
  samples: int = 1          # decode: rows per prompt, sharing its prefill (GRPO's group)
  requests: int = 0         # decode: completions of the workload (0: batch); more than
                            # batch: `batch` rows at once, refilled (continuous batching)
  min_new_tokens: int = 0   # decode: > 0: each prompt's budget log-uniform in
                            # [min_new_tokens, new_tokens] (a mixed-length workload)
  steps: int = 10           # timed steps (decode: timed generate calls, at least 1)
  warmup: int = 3           # untimed steps after compilation
  overrides: tuple = ()     # "key=value" config settings, e.g. "model.remat=full"
  reference: str = "copy"   # DPO: copy | precomputed | none (jaxlm.tasks.dpo)
  profile_dir: str = ""     # a jax.profiler trace of two timed steps goes here


def set_override(config, item: str) -> None:
  """`key.sub=value` on an ml_collections config, the value read by the key's type as
  the launcher reads `--config.key.sub=value` (jaxlm.cli.apply_override)."""
  key, sep, value = item.partition("=")
  if not sep:
    raise ConfigError(f"--set {item!r}: expected key=value")
  apply_override(config, key.strip(), value, flag=f"--set {key.strip()}")


def make_config(spec: Spec):
  """The run config a user would launch with, at the spec's shape."""
  if spec.task not in TASKS:
    raise ConfigError(f"task={spec.task!r}: one of {', '.join(TASKS)}")
  c = base_config()
  c.task = {"decode": "pretrain"}.get(spec.task, spec.task)
  c.model = model_config(spec.preset)
  if not c.model.vocab_size:
    c.model.vocab_size = TINY_VOCAB
  rows, length = DEFAULT_SHAPES.get(spec.preset, (8, 2048))
  c.data.batch_size = spec.batch or rows
  c.data.seq_len = spec.seq or (128 if spec.task == "decode" else length)
  if spec.task == "dpo":  # records of a chosen and a rejected response
    if c.data.batch_size % 2:
      raise ConfigError(f"--batch {c.data.batch_size}: DPO rows come in pairs; give an even count")
    c.data.batch_size //= 2
    c.dpo.reference = spec.reference
  c.steps = spec.warmup + spec.steps
  c.optimizer.warmup_steps = 1
  c.log_every = 1
  c.eval_every = 0
  for item in spec.overrides:
    set_override(c, item)
  # Random weights and synthetic tokens stand in for init_from and the data files.
  errors = [e for e in validate(c, jax.device_count())
            if not e.startswith(("data.train", "init_from")) and "needs init_from" not in e]
  if errors:
    raise ConfigError(errors[0])
  return c


# ---------------------------------------------------------------------------------------
# Synthetic batches


def _pretrain_rows(c, rng) -> dict:
  B, T, V = c.data.batch_size, c.data.seq_len, c.model.vocab_size
  ids = rng.integers(0, V, (B, T + 1), dtype=np.int32)
  return {"tokens": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((B, T), np.int32),
          "segment_ids": np.ones((B, T), np.int32),
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}


def _sft_rows(c, rng) -> dict:
  """Examples of T/16 to T/2 tokens, the first third of each a prompt (no loss), packed
  whole into rows by the training packer."""
  T, V = c.data.seq_len, c.model.vocab_size
  examples = []
  for _ in range(c.data.batch_size * 8):
    n = int(rng.integers(max(T // 16, 2), max(T // 2, 3)))
    ids = rng.integers(0, V, n + 1, dtype=np.int32)
    mask = np.ones(n, np.int32)
    mask[:n // 3] = 0
    examples.append({"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask})
  ds = sft.sft_dataset(examples, seq_len=T, batch_size=c.data.batch_size, seed=int(rng.integers(1 << 30)),
                       shuffle=True, packing=True)
  return {k: np.asarray(v) for k, v in next(iter(ds)).items()}


def _dpo_rows(c, rng) -> dict:
  """Records of two responses to one prompt, each sequence filling most of its row."""
  T, V = c.data.seq_len, c.model.vocab_size
  rows = []
  for _ in range(c.data.batch_size):
    prompt = rng.integers(0, V, T // 4, dtype=np.int32)
    ids, sup = [], []
    for _ in range(2):
      n = int(rng.integers(T - T // 8, T + 1))  # +1: shifted, the last id is a target only
      response = rng.integers(0, V, n + 1 - len(prompt), dtype=np.int32)
      ids.append(np.concatenate([prompt, response]))
      sup.append(np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(response), np.int32)]))
    ex = {"ids": ids, "supervised": sup, "pairs": [(0, 1)], "margins": [0.0]}
    if c.dpo.reference == "precomputed":
      ex["reference_logps"] = -rng.uniform(100, 1000, 2).astype(np.float32)
    rows.append(preference.pad_group(ex, 2, T, True))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def synthetic_batch(c, task: str, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"pretrain": _pretrain_rows, "sft": _sft_rows, "dpo": _dpo_rows}[task](c, rng)


# ---------------------------------------------------------------------------------------
# Measuring


def _peak_memory_gib() -> float | None:
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # CPU has none
    return None
  peak = stats.get("peak_bytes_in_use")
  return peak / 2**30 if peak else None


def _plan_gib(compiled) -> float | None:
  """XLA's memory plan of a compiled step: arguments + temporaries + outputs not aliased."""
  try:
    p = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if p is None:
    return None
  return (p.argument_size_in_bytes + p.temp_size_in_bytes + p.output_size_in_bytes
          - p.alias_size_in_bytes) / 2**30


def _build_task(c, task: str, sharder):
  parts = common.model_parts(c, "", sharder, pin_base=False)
  tokens = c.data.batch_size * c.data.seq_len
  if task == "dpo":
    parts["loss_fn"] = dpo.dpo_loss_fn(c, sharder)
    tokens *= 2
    if c.dpo.reference == "copy":
      if not c.lora.rank:
        parts.update(frozen_shapes=lambda rng: model.init(c.model, rng),
                     frozen_axes=model.param_axes(c.model))
      parts["flops_per_token"] += model.flops_per_token(c.model, c.data.seq_len) / 3
  return loop.Task(**parts, train_data=None, tokens_per_batch=tokens)


def _train(spec: Spec, c) -> dict:
  sharder = loop.make_sharder(c)
  task = _build_task(c, spec.task, sharder)
  t0 = time.perf_counter()
  s = loop.setup(c, task, sharder)
  frozen = None
  if task.frozen_shapes is not None:  # random weights where a run would load them
    frozen = jax.jit(task.frozen_shapes, out_shardings=s.frozen_shardings)(jax.random.PRNGKey(1))
  host = [synthetic_batch(c, spec.task, i) for i in range(4)]
  batches = [loop.device_batch(b, sharder) for b in host]
  jax.block_until_ready((s.state, frozen, batches))
  init_s = time.perf_counter() - t0
  # One step serves every batch: compiled for the most general layout among them.
  layouts = [loop.attention_layout(c, b, agree=False) for b in host]
  layout = None if None in layouts else max(layouts, key=attention.LAYOUTS.index)
  t0 = time.perf_counter()
  step = s.train_step.lower(s.state, frozen, batches[0], layout).compile()
  compile_s = time.perf_counter() - t0
  state = s.state
  for i in range(spec.warmup):
    state, m = step(state, frozen, batches[i % len(batches)])
  jax.block_until_ready(state)
  times = []
  for i in range(spec.steps):
    if spec.profile_dir and i == spec.steps - 2:
      jax.profiler.start_trace(spec.profile_dir)
    t0 = time.perf_counter()
    state, m = step(state, frozen, batches[i % len(batches)])
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  if spec.profile_dir:
    jax.profiler.stop_trace()
  loss = float(m["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"{spec.task} step produced a non-finite loss ({loss})")
  n_params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
  n_frozen = sum(int(x.size) for x in jax.tree.leaves(frozen)) if frozen is not None else 0
  return dict(step_s=statistics.median(times), step_s_min=min(times), step_s_max=max(times),
              compile_s=compile_s, init_s=init_s, tokens_per_step=task.tokens_per_batch,
              flops_per_token=task.flops_per_token, loss=loss, params_trained=n_params,
              params_frozen=n_frozen, plan_gib=_plan_gib(step), attention_layout=layout)


def budgets(n: int, low: int, high: int, seed: int = 0) -> np.ndarray:
  """`n` token budgets log-uniform in [low, high]: many short answers and a long tail,
  as a batch of RL rollouts has."""
  u = np.random.default_rng(seed).random(n)
  return np.clip(np.round(low * (high / low) ** u), low, high).astype(np.int32)


def _timed(call, steps: int, profile_dir: str = "") -> list[float]:
  """Seconds of `steps` calls (at least 1) after one untimed call (the compile); the
  first timed one traced into `profile_dir`."""
  call(jax.random.PRNGKey(0))
  times = []
  for i in range(max(steps, 1)):
    if profile_dir and i == 0:
      jax.profiler.start_trace(profile_dir)
    t0 = time.perf_counter()
    call(jax.random.PRNGKey(i + 1))
    times.append(time.perf_counter() - t0)
    if profile_dir and i == 0:
      jax.profiler.stop_trace()
  return times


def _decode(spec: Spec, c) -> dict:
  B, P, N = c.data.batch_size, c.data.seq_len, spec.new_tokens
  sharder = loop.make_sharder(c)
  m = frozen_model(c.model)
  params = jax.jit(lambda r: model.init(m, r),
                   out_shardings=sharder.tree(model.param_axes(m),
                                              jax.eval_shape(lambda r: model.init(m, r),
                                                             jax.random.PRNGKey(0))))(
                                                                 jax.random.PRNGKey(0))
  # eos -1: no row ends before its budget.
  engine = generate.Engine(c.model, eos_id=-1, vocab_size=c.model.vocab_size, sharder=sharder)
  sampling = generate.Sampling(max_new_tokens=N, temperature=1.0)
  G, total = spec.samples, spec.requests or B
  if G < 1 or B % G or total % G:
    raise ConfigError(f"--samples={G}: the batch's {B} rows and the {total} requests must be "
                      "whole groups")
  if not 0 <= spec.min_new_tokens <= N:
    raise ConfigError(f"--min_new_tokens={spec.min_new_tokens}: in [0, --new_tokens={N}]")
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, c.model.vocab_size, P, dtype=np.int32) for _ in range(total // G)]
  budget = (budgets(len(prompts), spec.min_new_tokens, N) if spec.min_new_tokens
            else np.full(len(prompts), N, np.int32))
  generated = int(budget.sum()) * G
  call = lambda key: engine.generate(params, prompts, key, sampling, samples=G, rows=B,  # noqa: E731
                                     max_new_tokens=budget)
  t0 = time.perf_counter()
  out = call(jax.random.PRNGKey(0))
  first_s = time.perf_counter() - t0
  if out.tokens.shape != (total, N) or not np.array_equal(out.lengths, np.repeat(budget, G)):
    raise RuntimeError(f"decode produced {out.tokens.shape}, lengths {set(out.lengths)}")
  times = _timed(call, spec.steps, spec.profile_dir)
  median = statistics.median(times)
  result = dict(step_s=median, step_s_min=min(times), step_s_max=max(times),
                compile_s=max(first_s - median, 0.0), new_tokens_per_s=generated / median,
                ms_per_token_step=1000 * median / N, tokens_per_step=generated,
                requests=total, min_new_tokens=spec.min_new_tokens,
                params_trained=sum(int(x.size) for x in jax.tree.leaves(params)))
  if total == B and not spec.min_new_tokens:  # one batch of B x N: its bandwidth floor
    result.update(decode_floor(m, params, B, P, N, median, copy_bandwidth()))
  else:  # a workload: against static batching (B rows at a time, each until its longest)
    per = B // G

    def static(key):
      for lo in range(0, len(prompts), per):
        engine.generate(params, prompts[lo:lo + per], jax.random.fold_in(key, lo), sampling,
                        samples=G, rows=B, max_new_tokens=budget[lo:lo + per])
    static_s = statistics.median(_timed(static, spec.steps))
    result.update(static_s=static_s, static_new_tokens_per_s=generated / static_s,
                  ms_per_new_token=1000 * median / generated,
                  static_ms_per_new_token=1000 * static_s / generated,
                  continuous_speedup=static_s / median)
  return result


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def decode_floor(cfg, params, B: int, P: int, N: int, step_s: float, copy_bytes_s: float) -> dict:
  """How far a decode call of B rows x (P + N) tokens taking `step_s` is from the memory
  bandwidth limit. Each token step must read the weights as the engine holds them and
  the cache's filled slots (P + n at step n, so P + (N - 1) / 2 on average); the engine
  reads the whole cache (P + N slots). The floor is those bytes at the device's copy
  bandwidth (`copy_bytes_s`, bytes read and written a second)."""
  weights = _nbytes(jax.eval_shape(lambda p: model.compute_weights(p, cfg), params))
  cache = _nbytes(jax.eval_shape(lambda: model.init_cache(cfg, B, P + N)))
  per_slot = cache / (P + N)
  live = per_slot * (P + (N - 1) / 2)
  step = step_s / N   # one token step (the prompt's prefill counted in)
  floor = (weights + live) / copy_bytes_s
  return dict(weight_gb=weights / 1e9, cache_gb=cache / 1e9, cache_live_gb=live / 1e9,
              read_tb_s=(weights + cache) / step / 1e12,
              weight_read_tb_s=weights / step / 1e12,
              copy_tb_s=copy_bytes_s / 1e12, floor_ms_per_token_step=1000 * floor,
              floor_new_tokens_per_s=B / floor, of_floor=floor / step)


def copy_bandwidth(nbytes: int = 0, repeats: int = 20) -> float:
  """Bytes a second (read plus written) of a buffer (1 GiB on an accelerator, 64 MiB on a
  CPU) rewritten `repeats` times back to back (dispatch is asynchronous, so the device
  runs one pass after another and no launch is timed): what a decode step's reads are
  measured against. The best of three such runs."""
  if not nbytes:
    nbytes = (64 << 20) if jax.default_backend() == "cpu" else (1 << 30)
  rewrite = jax.jit(lambda a: a + jnp.bfloat16(1))  # reads and writes every byte once
  x = jax.block_until_ready(rewrite(jnp.ones((nbytes // 2,), jnp.bfloat16)))
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(repeats):
      x = rewrite(x)
    jax.block_until_ready(x)
    best = min(best, time.perf_counter() - t0)
  return 2 * repeats * x.size * x.dtype.itemsize / best


def run(spec: Spec) -> dict:
  """Measure one (preset, task, shape); the result as a flat dict (see tools/bench.py)."""
  c = make_config(spec)
  result = {"preset": spec.preset, "task": spec.task, "batch": spec.batch or
            (c.data.batch_size * (2 if spec.task == "dpo" else 1)), "seq": c.data.seq_len,
            "remat": c.model.remat, "attention": c.model.attention,
            "logits_chunk": c.model.logits_chunk, "layer_loop": c.model.layer_loop,
            "overrides": list(spec.overrides)}
  if spec.task == "dpo":
    result["reference"] = spec.reference
  if spec.task == "decode":
    result["new_tokens"] = spec.new_tokens
    result["samples"] = spec.samples
    result.update(_decode(spec, c))
  else:
    result.update(_train(spec, c))
    result["tokens_per_s"] = result["tokens_per_step"] / result["step_s"]
    peak = metrics_lib.peak_flops_per_device(c.peak_tflops)
    result["mfu"] = (result["tokens_per_s"] * result["flops_per_token"] / (peak * jax.device_count())
                     if peak else None)
  result["peak_memory_gib"] = _peak_memory_gib()
  result.update(console.environment())
  if spec.profile_dir:
    trace = _trace(spec.profile_dir)
    result["profile"] = profile_summary(trace)
    totals = profile_totals(trace)
    if totals and spec.task == "decode":  # the trace holds one generate call
      steps = spec.new_tokens
      totals.update(kernels_per_token_step=totals["kernels"] / steps,
                    kernels_per_layer_step=totals["kernels"] / steps / c.model.num_layers,
                    gap_us_per_kernel=1000 * (totals["span_ms"] - totals["busy_ms"])
                    / totals["kernels"])
    result["profile_totals"] = totals
  return result


# ---------------------------------------------------------------------------------------
# Profiles


def _trace(directory: str):
  """The newest jax.profiler trace under `directory`, read from its XSpace with
  jax.profiler.ProfileData (no TensorBoard needed); None without one."""
  paths = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))
  return jax.profiler.ProfileData.from_file(paths[-1]) if paths else None


def profile_summary(trace, top: int = 25) -> list[dict]:
  """The device ops that took the most time in a trace (`_trace`): name, calls, total
  ms and share of the device's busy time."""
  if trace is None:
    return []
  totals, counts = {}, {}
  for line in _device_op_lines(trace):
    for ev in line.events:
      totals[ev.name] = totals.get(ev.name, 0.0) + ev.duration_ns
      counts[ev.name] = counts.get(ev.name, 0) + 1
  busy = sum(totals.values()) or 1.0
  ranked = sorted(totals, key=totals.get, reverse=True)[:top]
  return [{"op": n, "calls": counts[n], "ms": totals[n] / 1e6, "share": totals[n] / busy}
          for n in ranked]


def _device_op_lines(data):
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    lines = list(plane.lines)
    yield from ([ln for ln in lines if ln.name == "XLA Ops"] or
                [ln for ln in lines if "stream" in ln.name.lower()])


def profile_totals(trace) -> dict:
  """A trace's (`_trace`) device kernels: how many, their summed time and the span from
  the first start to the last end (busy / span is how much of the time the device
  computes; the rest is gaps between kernels)."""
  if trace is None:
    return {}
  n, busy, first, last = 0, 0, None, None
  for line in _device_op_lines(trace):
    for ev in line.events:
      n, busy = n + 1, busy + ev.duration_ns
      first = ev.start_ns if first is None else min(first, ev.start_ns)
      last = ev.end_ns if last is None else max(last, ev.end_ns)
  if not n:
    return {}
  return {"kernels": n, "busy_ms": busy / 1e6, "span_ms": (last - first) / 1e6}


def format_table(results: list[dict]) -> str:
  head = ("| preset | task | batch x seq | tokens/s | MFU | step (median) | peak memory "
          "| compile |\n|---|---|---|---|---|---|---|---|")
  rows = []
  for r in results:
    if r.get("error"):
      rows.append(f"| {r['preset']} | {r['task']} | | error: {r['error']} | | | | |")
      continue
    shape = (f"{r['batch']} x ({r['seq']} + {r['new_tokens']})" if r["task"] == "decode"
             else f"{r['batch']} x {r['seq']}")
    tps = r.get("new_tokens_per_s") or r.get("tokens_per_s")
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
    mem = r.get("peak_memory_gib") or r.get("plan_gib")
    mem = f"{mem:.2f} GiB" if mem else "-"
    task = r["task"] + (f" ({r['reference']})" if r.get("reference") else "")
    rows.append(f"| {r['preset']} | {task} | {shape} | {tps:,.0f} | {mfu} | "
                f"{1000 * r['step_s']:.1f} ms | {mem} | {r['compile_s']:.1f} s |")
  return "\n".join([head, *rows])


def format_floor(r: dict) -> str:
  """A decode row's distance to the bandwidth floor, in one line."""
  return (f"{r['preset']} decode {r['batch']} x ({r['seq']} + {r['new_tokens']}): "
          f"{r['ms_per_token_step']:.3f} ms a token step, reading {r['weight_gb']:.2f} GB of "
          f"weights + {r['cache_gb']:.2f} GB of cache ({r['cache_live_gb']:.2f} GB filled on "
          f"average) at {r['read_tb_s']:.2f} TB/s; copy bandwidth {r['copy_tb_s']:.2f} TB/s, "
          f"floor {r['floor_ms_per_token_step']:.3f} ms ({r['floor_new_tokens_per_s']:,.0f} "
          f"new tokens/s): {100 * r['of_floor']:.0f}% of the floor")


def format_workload(r: dict) -> str:
  """A mixed-length decode workload's continuous against static batching, in one line."""
  lengths = (f"{r['min_new_tokens']} to {r['new_tokens']}" if r["min_new_tokens"]
             else str(r["new_tokens"]))
  return (f"{r['preset']} decode, {r['requests']} completions of {lengths} new tokens, "
          f"{r['batch']} rows: continuous batching {r['ms_per_new_token']:.4f} ms a new token "
          f"({r['new_tokens_per_s']:,.0f}/s), static batches {r['static_ms_per_new_token']:.4f} "
          f"ms ({r['static_new_tokens_per_s']:,.0f}/s): {r['continuous_speedup']:.2f}x")


def default_profile_dir() -> str:
  return tempfile.mkdtemp(prefix="jaxlm-profile-")
