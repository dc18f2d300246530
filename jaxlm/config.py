"""Shared config defaults, model shape presets, and validation.

Every knob any task reads exists here with a comment, so a locked config accepts
it on the command line (`--config.optimizer.lr=3e-4`) and rejects unknown keys.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import traceback

import ml_collections

from jaxlm import fileio


# Model shapes shared by configs, benchmarks and the cost estimator.
MODEL_PRESETS = {
    # Small enough to train on 2 CPU cores in a couple of minutes.
    "tiny": dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, ffn_dim=352),
    "llama_150m": dict(d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, ffn_dim=2048,
                       vocab_size=32000),
    "tinyllama_1b": dict(d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4, ffn_dim=5632,
                         vocab_size=32000),
    "llama3_3b": dict(d_model=3072, num_layers=28, num_heads=24, num_kv_heads=8, ffn_dim=8192,
                      vocab_size=128256, rope_theta=500000.0, tie_embeddings=True),
    "llama3_8b": dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, ffn_dim=14336,
                      vocab_size=128256, rope_theta=500000.0),
    "gpt2_small": dict(family="gpt2", d_model=768, num_layers=12, num_heads=12, num_kv_heads=12,
                       ffn_dim=3072, vocab_size=50257, tie_embeddings=True, max_seq_len=1024,
                       norm_eps=1e-5),
}

# Ordered rules mapping logical axis names to mesh axes. For each dimension the first
# rule whose mesh axes are still unused in that array wins; `None` means replicate.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("norm", None),
    ("position", None),
    ("lora_rank", None),
)


def model_config(preset: str = "tiny", **overrides) -> ml_collections.ConfigDict:
  """The model section: defaults, then a shape preset, then overrides."""
  if preset not in MODEL_PRESETS:
    raise ConfigError(f"model preset {preset!r}: must be one of {', '.join(MODEL_PRESETS)}")
  m = ml_collections.ConfigDict()
  m.family = "llama"            # "llama" (RMSNorm, RoPE, SwiGLU, GQA) or "gpt2"
  m.vocab_size = 0              # 0: take the tokenizer's size, padded to vocab_multiple
  m.vocab_multiple = 128        # pad the vocabulary to a multiple of this (sharding, MXU tiles)
  m.d_model = 128
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 4            # < num_heads: grouped-query attention
  m.head_dim = 0                # 0: d_model // num_heads
  m.ffn_dim = 512
  m.max_seq_len = 2048          # learned position table size (gpt2 only)
  m.rope_theta = 10000.0
  m.rope_scaling_factor = 0.0   # > 0 enables Llama-3 frequency scaling with the three fields below
  m.rope_low_freq_factor = 1.0
  m.rope_high_freq_factor = 4.0
  m.rope_original_max_len = 8192
  m.norm_eps = 1e-6
  m.qkv_bias = False            # Qwen2-style biases on q, k, v
  m.tie_embeddings = False      # share the input embedding with the output projection
  m.init_std = 0.02
  m.dtype = "bfloat16"          # compute dtype
  m.param_dtype = "float32"     # storage dtype of parameters and optimizer state
  m.remat = "minimal"           # "none" | "minimal" (save projections, attention) | "full"
  m.attention = "auto"          # "auto" | "xla" | "cudnn" | "splash"
  m.logits_chunk = 0            # > 0: the loss takes logits this many positions at a time
  m.layer_loop = "auto"         # "scan" | "unroll" | "auto": unroll when every device holds
                                # the whole weights (no fsdp or tensor sharding), else scan
  for k, v in {**MODEL_PRESETS[preset], **overrides}.items():
    setattr(m, k, v)
  return m


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every task. Configs under configs/ start here."""
  c = ml_collections.ConfigDict()
  c.task = "pretrain"            # "pretrain" | "sft" | "reward" | "dpo" | "grpo" | "ppo" | "eval"
                                # | "pipeline"
  c.steps = 1000
  c.seed = 0
  c.log_every = 10
  c.eval_every = 200            # 0 disables evaluation
  c.eval_steps = 10             # batches per evaluation
  c.checkpoint_every = 200      # a checkpoint is also written at the end
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.preemption_grace_s = 60.0   # SIGTERM: the checkpoint should be written within this (warned if not)
  c.nan_policy = "stop"         # non-finite loss or gradients: "stop" (dump, then stop) | "skip" (no update)
  c.max_skipped_steps = 10      # nan_policy "skip": this many skipped updates in a row stop the run
  c.loss_spike_factor = 3.0     # log an event when a logged loss exceeds this x the running mean; 0: off
  c.loss_spike_window = 20      # logged losses in that running mean
  c.init_from = ""              # a jaxlm workdir / checkpoint, or a Hugging Face model directory
  c.peak_tflops = 0.0           # per-device peak for MFU; 0: look up the device kind
  c.progress = "auto"           # "auto" (bar on a terminal) | "bar" | "log"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1               # pure data parallelism (replicated params)
  c.mesh.fsdp = -1              # data parallelism with sharded params; -1: fill the devices
  c.mesh.tensor = 1             # tensor (model) parallelism

  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = DEFAULT_RULES

  c.model = model_config("tiny")

  c.data = ml_collections.ConfigDict()
  c.data.train = ""             # globs, a prepared corpus directory, or tfds:NAME[:VERSION]:SPLIT
  c.data.eval = ""              # the same; empty disables evaluation
  c.data.tfds_data_dir = ""     # where TFDS datasets are prepared; empty: TFDS's default
  c.data.mixture = ""           # prepared corpus: "name=weight,..."; empty: its recorded weights
  c.data.on_exhausted = "repeat"  # "repeat" (new epoch, reshuffled) | "stop" (end the run)
  c.data.format = "auto"        # "auto" (by extension) | "text" | "jsonl"
  c.data.text_field = "text"    # JSONL field holding the document
  c.data.text_split = "file"    # text files: "file" (one document each) | "paragraph" (blank lines)
  c.data.tokenizer = ""         # SentencePiece .model; empty: train one into the workdir
  c.data.tokenizer_vocab_size = 4096
  c.data.tokenizer_sample_chars = 4_000_000
  c.data.seq_len = 256
  c.data.batch_size = 16        # global, in sequences (reward, dpo: records)
  c.data.shuffle = True
  c.data.prefetch = 2           # batches prepared ahead in a background thread
  c.data.shards = 0             # pretrain, sft: data split into this many shards (a multiple of
                                # the process count, dividing batch_size); batches, losses and
                                # checkpoints are the same on any process count dividing it.
                                # 0: auto, gcd(batch_size, lcm(8, processes)): 8 when 8 divides
                                # batch_size, the same on 1, 2, 4 or 8 processes
  # SFT (task "sft"): records -> chat template -> tokens with a loss mask
  c.data.sft_format = "auto"    # "auto" (by fields) | "alpaca" | "messages" | "prompt_completion" | "text"
  c.data.chat_template = "jaxlm"  # "jaxlm" | "chatml" | "llama3" | "hf" (tokenizer_config.json's)
  c.data.loss_on = "completion"  # "completion" (assistant turns) | "all" tokens
  c.data.packing = True         # pack whole examples into rows (first fit); else pad each
  c.data.truncation = "truncate"  # examples over seq_len: "truncate" | "drop"
  c.data.on_error = "raise"     # bad records: "raise" (file:line) | "skip" (counted)
  c.data.max_record_bytes = 1 << 24  # a document, line or record over this is `too_long`
                                # (under data.on_error); memory stays bounded by it

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 3e-4
  c.optimizer.schedule = "cosine"   # "cosine" | "linear" | "constant" | "wsd"
  c.optimizer.warmup_steps = 100
  c.optimizer.decay_fraction = 0.2  # wsd: final fraction of steps that decays
  c.optimizer.min_lr_ratio = 0.1    # final lr = lr * min_lr_ratio
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.decay_embeddings = False
  c.optimizer.decay_norms_and_biases = False
  c.optimizer.grad_clip = 1.0       # global-norm clipping; 0 disables
  c.optimizer.grad_accum_steps = 1  # microbatches per step

  c.loss = ml_collections.ConfigDict()
  c.loss.z_loss = 0.0               # coefficient of log(Z)^2

  c.lora = ml_collections.ConfigDict()  # low-rank adapters over a frozen init_from base
  c.lora.rank = 0                   # 0: off (train every weight)
  c.lora.alpha = 16.0               # the update is scaled by alpha / rank
  c.lora.dropout = 0.0              # dropout on the adapters' input
  c.lora.targets = "(wq|wk|wv|wo|w_gate|w_up|w_down)$"  # regex over layers/<name>

  c.reward = ml_collections.ConfigDict()  # task "reward": Bradley-Terry on preference pairs
  c.reward.center_coef = 0.0        # + coef * (r_chosen + r_rejected)^2 per pair (centering)
  c.reward.normalize_on = ""        # after training, rewards get mean 0 / std 1 on this set:
                                    # "eval" (data.eval) or preference-file globs; empty: off

  c.rl = ml_collections.ConfigDict()  # tasks "grpo" and "ppo"; data.batch_size = prompts a step
  c.rl.num_generations = 4          # completions per prompt (GRPO's group size G)
  c.rl.max_new_tokens = 64
  c.rl.temperature = 1.0            # sampling; the trainer's log-probs use it too
  c.rl.top_k = 0
  c.rl.top_p = 1.0
  c.rl.epochs = 1                   # passes over each rollout batch
  c.rl.minibatches = 1              # optimizer updates per pass
  c.rl.clip_low = 0.2               # ratio clipped to [1 - clip_low, 1 + clip_high]
  c.rl.clip_high = 0.2
  c.rl.kl_coef = 0.04               # KL to the reference; GRPO: 0 drops the reference
  c.rl.kl_estimator = "k3"          # PPO: "k1" (in the reward) | "k3" (a loss term); GRPO: k3
  c.rl.kl_target = 0.0              # PPO: > 0 adapts kl_coef toward this KL per token
  c.rl.advantage_scale = "group"    # GRPO: divide by the "group" | "batch" std, or "none"
  c.rl.loss_agg = "sequence"        # "sequence" mean | "token" mean (DAPO) | "constant" (Dr. GRPO)
  c.rl.missing_eos_penalty = 0.0    # subtracted from the score of completions without EOS
  c.rl.gamma = 1.0                  # PPO: GAE discount
  c.rl.lam = 0.95                   # PPO: GAE lambda
  c.rl.vf_coef = 0.1                # PPO: weight of the value loss
  c.rl.value_clip = 0.2             # PPO: value updates clipped around the rollout's values
  c.rl.whiten_rewards = False       # PPO: whiten the per-token rewards of each batch
  c.rl.critic_from = ""             # PPO: value head's start (a reward run or an LM); empty: init_from
  c.reward.fn = ""                  # RL: "name[=weight],..." built-ins or package.module:function
  c.reward.model = ""               # RL: a jaxlm reward run scoring completions
  c.reward.model_weight = 1.0

  c.dpo = ml_collections.ConfigDict()  # task "dpo": direct preference optimization and its relatives
  c.dpo.loss = "sigmoid"            # "sigmoid" (DPO, cDPO) | "robust" | "ipo" | "hinge"
  c.dpo.beta = 0.1                  # strength of the implicit KL to the reference
  c.dpo.label_smoothing = 0.0       # sigmoid/robust: assumed share of flipped labels, < 0.5
  c.dpo.reference = "copy"          # "copy" (frozen weights; with LoRA the base, adapters
                                    # off) | "precomputed" (one pass first) | "none" (free)
  c.dpo.reference_from = ""         # the reference's weights; empty: init_from
  c.dpo.sft_weight = 0.0            # + weight * per-token NLL of chosen (RPO)

  c.eval = ml_collections.ConfigDict()  # task "eval", tools/eval.py, pipeline stages
  c.eval.model = ""                 # the checkpoint: a jaxlm run (any task) or a HF directory
  c.eval.tasks = ""                 # prompt records with an `answer` (e.g. gsm8k_test.jsonl)
  c.eval.max_tasks = 256            # the first N tasks (and pairs); 0: all
  c.eval.max_new_tokens = 64
  c.eval.temperature = 1.0          # sampled accuracy and KL samples; 0 skips them
  c.eval.top_k = 0
  c.eval.top_p = 1.0
  c.eval.seed = 0
  c.eval.batch_size = 64            # rows per generation or perplexity batch
  c.eval.text = ""                  # held-out text for perplexity (globs or builtin:...)
  c.eval.text_batches = 8           # perplexity over at most this many batches
  c.eval.seq_len = 256              # perplexity row length
  c.eval.pairs = ""                 # reward models: held-out preference pairs
  c.eval.reward_model = ""          # a reward run judging greedy completions (reward_mean)
  c.eval.baseline = ""              # another evaluation's folder: win_rate against its samples
  c.eval.reference = ""             # a model to measure kl_to_reference against
  c.eval.chat_template = ""         # default: the run's data.chat_template (hf for HF dirs)
  c.eval.show = 4                   # sample completions kept in eval.json
  return c


class ConfigError(ValueError):
  """A config problem, phrased as one line naming the key."""


_CHOICES = {
    "model.family": ("llama", "gpt2"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "minimal", "full"),
    "model.layer_loop": ("auto", "scan", "unroll"),
    "model.attention": ("auto", "xla", "cudnn", "splash"),
    "data.format": ("auto", "text", "jsonl"),
    "data.on_exhausted": ("repeat", "stop"),
    "data.sft_format": ("auto", "alpaca", "messages", "prompt_completion", "text"),
    "data.chat_template": ("jaxlm", "chatml", "llama3", "hf"),
    "data.loss_on": ("completion", "all"),
    "data.truncation": ("truncate", "drop"),
    "data.on_error": ("raise", "skip"),
    "data.text_split": ("file", "paragraph"),
    "optimizer.schedule": ("cosine", "linear", "constant", "wsd"),
    "progress": ("auto", "bar", "log"),
    "nan_policy": ("stop", "skip"),
    "dpo.loss": ("sigmoid", "robust", "ipo", "hinge"),
    "dpo.reference": ("copy", "precomputed", "none"),
    "rl.kl_estimator": ("k1", "k3"),
    "rl.advantage_scale": ("group", "batch", "none"),
    "rl.loss_agg": ("sequence", "token", "constant"),
    "eval.chat_template": ("", "jaxlm", "chatml", "llama3", "hf"),
}

# Every numeric field of base_config has a range: > 0, >= 0, or a narrower interval.
# Every float must also be finite (no key gives inf or nan a meaning), and every integer
# must fit in 32 bits (JAX's default integer).
_RANGES = {  # interval notation: "[0, 1)" holds 0 but not 1
    **dict.fromkeys(("steps", "log_every", "keep_checkpoints", "checkpoint_every", "model.d_model",
                      "model.num_layers", "model.num_heads", "model.num_kv_heads",
                      "model.ffn_dim", "data.seq_len", "data.batch_size", "optimizer.lr",
                      "optimizer.grad_accum_steps", "model.vocab_multiple",
                      "max_skipped_steps", "loss_spike_window", "model.max_seq_len",
                      "model.rope_theta", "model.rope_low_freq_factor",
                      "model.rope_high_freq_factor", "model.rope_original_max_len",
                      "model.init_std", "data.tokenizer_vocab_size",
                      "data.tokenizer_sample_chars", "data.max_record_bytes", "optimizer.eps",
                      "lora.alpha", "dpo.beta",
                      "rl.num_generations", "rl.max_new_tokens", "rl.epochs", "rl.minibatches",
                      "eval.max_new_tokens", "eval.batch_size", "eval.seq_len"), "(0, inf)"),
    **dict.fromkeys(("eval_every", "eval_steps", "optimizer.warmup_steps", "optimizer.weight_decay",
                      "optimizer.grad_clip", "loss.z_loss", "model.vocab_size",
                      "model.head_dim", "model.logits_chunk", "peak_tflops",
                      "preemption_grace_s", "loss_spike_factor", "data.prefetch",
                      "data.shards", "model.rope_scaling_factor", "seed", "reward.center_coef",
                      "dpo.sft_weight", "rl.kl_coef", "rl.kl_target", "rl.temperature",
                      "rl.top_k", "rl.missing_eos_penalty", "rl.vf_coef", "rl.value_clip",
                      "rl.clip_high", "lora.rank", "eval.max_tasks", "eval.temperature",
                      "eval.top_k", "eval.seed", "eval.text_batches", "eval.show"), "[0, inf)"),
    "optimizer.b1": "[0, 1)",
    "optimizer.b2": "[0, 1)",
    "optimizer.min_lr_ratio": "[0, 1]",
    "optimizer.decay_fraction": "(0, 1]",
    "model.norm_eps": "(0, 1)",
    "lora.dropout": "[0, 1)",
    "dpo.label_smoothing": "[0, 0.5)",
    "rl.top_p": "(0, 1]",
    "rl.clip_low": "[0, 1)",
    "rl.gamma": "[0, 1]",
    "rl.lam": "[0, 1]",
    "eval.top_p": "(0, 1]",
}
_INT_LIMIT = 2**31 - 1


def _rule(interval: str) -> str:
  """What an interval requires, as the error says it: "> 0", ">= 0", "in [0, 1)"."""
  if interval.endswith(", inf)"):
    return f"{'>' if interval[0] == '(' else '>='} {interval[1:-len(', inf)')]}"
  return f"in {interval}"


def _in_interval(value, interval: str) -> bool:
  low, high = (float(x) for x in interval[1:-1].split(","))
  above = value > low if interval[0] == "(" else value >= low
  below = value < high if interval[-1] == ")" else value <= high
  return above and below


def one_line(message) -> str:
  """`message` as one line: line breaks (from a value or a library's text) escaped."""
  text = str(message).strip()
  return text.replace("\r", "\\r").replace("\n", "\\n")


def error_detail(e: BaseException) -> str:
  """An exception as one line: its type and the first line of its message."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def get_key(config, dotted):
  """The value at a dotted key (`optimizer.lr`), or None when the config has no such key."""
  node = config
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return None
    node = node[part]
  return node


def _type_name(value) -> str:
  return "None" if value is None else type(value).__name__


def type_problem(default, value) -> str | None:
  """Why `value` can't stand where base_config has `default`; None when it can (an int
  stands for a float)."""
  number = isinstance(value, numbers.Real) and not isinstance(value, bool)
  if isinstance(default, bool):
    ok, want = isinstance(value, bool), "True or False"
  elif isinstance(default, int):
    ok, want = number and isinstance(value, numbers.Integral), "an integer"
  elif isinstance(default, float):
    ok, want = number, "a number"
  elif isinstance(default, str):
    ok, want = isinstance(value, str), "a string"
  elif isinstance(default, (tuple, list)):
    ok, want = isinstance(value, (tuple, list)), "a tuple"
  elif isinstance(default, ml_collections.ConfigDict):
    ok, want = isinstance(value, (ml_collections.ConfigDict, dict)), "a section (a dict)"
  else:
    return None
  return None if ok else f"must be {want}, not {_type_name(value)}"


def set_key(config, dotted: str, value) -> None:
  """Set an existing dotted key (`optimizer.lr`); ConfigError naming it when the config
  has no such key or the value has the wrong type. An int given for a float field is
  stored as a float; a dict given for a section sets its keys one by one."""
  *parents, leaf = dotted.split(".")
  node = get_key(config, ".".join(parents)) if parents else config
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(f"no config key {dotted!r}")
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
    for key, sub in value.items():
      set_key(config, f"{dotted}.{key}", sub)
    return
  problem = type_problem(current, value) if current is not None else None
  if problem:
    raise ConfigError(one_line(f"{dotted}={value!r}: {problem}"))
  if isinstance(current, float) and isinstance(value, numbers.Integral):
    value = float(value)
  try:
    setattr(node, leaf, value)
  except (TypeError, ValueError, AttributeError, KeyError) as e:  # ml_collections' own checks
    raise ConfigError(one_line(f"{dotted}={value!r}: {e}")) from None


def expand_globs(spec: str, key: str) -> list[str]:
  """Comma-separated globs or directories -> sorted file list (the rules are
  `fileio.expand`'s: `**` recurses, a directory means every file under it); an error
  naming `key` if one matches nothing."""
  try:
    expanded = fileio.expand(spec)
  except ValueError as e:  # a NUL byte, a path too long
    raise ConfigError(one_line(f"{key}: {e}")) from None
  files = []
  for pattern, matched in expanded:
    if not matched:
      raise ConfigError(one_line(f"{key}: no file matches {pattern!r}"))
    files.extend(matched)
  return files


def mesh_shape(config, num_devices: int) -> dict[str, int]:
  """Resolve `config.mesh` (one size may be -1) against the device count."""
  from jaxlm import sharding  # pylint: disable=import-outside-toplevel
  sizes = {a: int(config.mesh[a]) for a in sharding.MESH_AXES}
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"mesh.{a}={s}: mesh sizes must be positive or -1")
  try:
    shape = sharding.resolve_mesh_shape(sizes, num_devices)
  except sharding.ShardingError as e:
    raise ConfigError(f"mesh: {e}") from None
  return dict(zip(sharding.MESH_AXES, shape))


def _structure_errors(config) -> tuple[list[str], list[str], set]:
  """(missing, unknown or mistyped keys; non-finite or out-of-32-bit numbers; the keys
  named), checked against base_config: a section overridden whole
  (`--config.optimizer="{'lr': 1}"`), a sweep's None or a bool for a number all land here."""
  shape_errors, number_errors, bad = [], [], set()

  def walk(default, node, prefix):
    for k, d in default.items():
      key = prefix + k
      if k not in node:
        shape_errors.append(f"{key}: missing (a section set as a whole must keep every key)")
        bad.add(key)
        continue
      v = node[k]
      problem = type_problem(d, v)
      if problem:
        shape_errors.append(f"{key}={v!r}: {problem}")
        bad.add(key)
      elif isinstance(d, ml_collections.ConfigDict):
        walk(d, v, key + ".")
      elif isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral)):
        if not math.isfinite(v):
          number_errors.append(f"{key}={v!r}: must be a finite number")
          bad.add(key)
      elif isinstance(v, numbers.Integral) and not isinstance(v, bool) and abs(v) > _INT_LIMIT:
        number_errors.append(f"{key}={v}: out of range; integers must fit in 32 bits "
                             f"(|{key}| <= {_INT_LIMIT})")
        bad.add(key)
    for k in node:
      if k not in default:
        shape_errors.append(f"{prefix}{k}: unknown key")
        bad.add(prefix + k)

  walk(base_config(), config, "")
  return shape_errors, number_errors, bad


def _rules_errors(rules) -> list[str]:
  from jaxlm.sharding import MESH_AXES  # pylint: disable=import-outside-toplevel
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      return [f"sharding.rules[{i}]={rule!r}: each rule is (logical axis name, mesh axes "
              f"or None), e.g. ('embed', 'fsdp')"]
    axes = rule[1]
    names = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if not isinstance(names, (tuple, list)) or any(a not in MESH_AXES for a in names):
      return [f"sharding.rules[{i}]={tuple(rule)!r}: mesh axes must be None or among "
              f"{', '.join(MESH_AXES)}"]
  return []


def _reward_fn_errors(spec: str) -> list[str]:
  """reward.fn's syntax, and each user function imported and checked (rewards.py)."""
  from jaxlm import rewards  # pylint: disable=import-outside-toplevel
  return rewards.spec_errors(spec)


def validate(config, num_devices: int, num_processes: int = 1) -> list[str]:
  """Every problem in `config`, each as one line naming the key. Empty when valid."""
  shape_errors, errors, bad = _structure_errors(config)
  if shape_errors:  # every check below reads base_config's keys and types
    return [one_line(e) for e in shape_errors + errors]
  return [one_line(e) for e in _semantic_errors(config, num_devices, num_processes, errors, bad)]


def _range_errors(config, errors: list, bad: set) -> None:
  """Choices and numeric ranges, added to `errors`; each key reported joins `bad`."""
  def require(key, holds, rule):
    value = get_key(config, key)
    if key not in bad and not holds(value):
      errors.append(f"{key}={value!r}: must be {rule}")
      bad.add(key)

  for key, choices in _CHOICES.items():
    require(key, lambda v, choices=choices: v in choices,
            f"one of {', '.join(c or repr(c) for c in choices)}")
  for key, interval in _RANGES.items():
    require(key, lambda v, interval=interval: _in_interval(v, interval), _rule(interval))
  require("loss_spike_factor", lambda v: v == 0 or v > 1,
          "0 (off) or > 1 (a loss over this many times the running mean)")


def _model_shape_errors(m, ok) -> list[str]:
  """Shape rules across model keys (`ok(*keys)`: none of them is reported already)."""
  errors = []
  if (ok("model.rope_scaling_factor", "model.rope_low_freq_factor",
         "model.rope_high_freq_factor") and m.rope_scaling_factor > 0
      and not m.rope_high_freq_factor > m.rope_low_freq_factor):
    errors.append(f"model.rope_high_freq_factor={m.rope_high_freq_factor} must be > "
                  f"model.rope_low_freq_factor={m.rope_low_freq_factor} (Llama-3 scaling)")
  if ok("model.num_heads", "model.num_kv_heads") and m.num_heads % m.num_kv_heads:
    errors.append(f"model.num_heads={m.num_heads} is not divisible by "
                  f"model.num_kv_heads={m.num_kv_heads}")
  if (ok("model.d_model", "model.num_heads", "model.head_dim") and not m.head_dim
      and m.d_model % m.num_heads):
    errors.append(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads} "
                  f"(set model.head_dim)")
  if (ok("model.d_model", "model.num_heads", "model.head_dim", "model.family")
      and (m.head_dim or m.d_model // m.num_heads) % 2 and m.family == "llama"):
    errors.append("model.head_dim must be even for rotary embeddings")
  return errors


def section_errors(name: str, section, rules=None) -> list[str]:
  """The problems of one section alone (`NAME.KEY=...`, one line each), for a section
  read from elsewhere (a model's from a Hugging Face config.json, an eval's from
  tools/eval.py's flags): its keys and types, then ranges and choices, then
  `rules(section, ok)` across keys (`ok(*keys)`: none of them is reported already)."""
  c = base_config()
  c[name] = section
  shape_errors, errors, bad = _structure_errors(c)
  errors = [e for e in shape_errors + errors if e.startswith(f"{name}.")]
  if not errors:
    _range_errors(c, errors, bad)
    errors = [e for e in errors if e.startswith(f"{name}.")]
    errors += rules(section, lambda *keys: not bad.intersection(keys)) if rules else []
  return [one_line(e) for e in errors]


def model_errors(m) -> list[str]:
  """The problems of a model section alone: `section_errors` and the shape rules."""
  return section_errors("model", m, _model_shape_errors)


def _semantic_errors(config, num_devices, num_processes, errors, bad) -> list[str]:
  from jaxlm.data.prepare import is_prepared  # pylint: disable=import-outside-toplevel

  def check(fn):
    try:
      fn()
    except ConfigError as e:
      errors.append(str(e))

  def ok(*keys):  # none of these keys is already reported: checks across them are safe
    return not bad.intersection(keys)

  _range_errors(config, errors, bad)
  errors += _rules_errors(config.sharding.rules)
  try:
    re.compile(config.lora.targets)
  except (re.error, ValueError) as e:
    errors.append(f"lora.targets={config.lora.targets!r}: not a regular expression ({e})")

  m = config.model
  errors += _model_shape_errors(m, ok)
  if ok("lora.rank") and config.lora.rank > 0 and not config.init_from:
    errors.append(f"lora.rank={config.lora.rank} needs init_from: adapters tune a trained "
                  f"base model")
  if config.task == "dpo":
    dpo = config.dpo
    if not config.init_from:
      errors.append("init_from: task='dpo' needs the model it aligns (a jaxlm run or a "
                    "Hugging Face directory); the policy starts there and, by default, "
                    "the reference is a copy of it")
    if dpo.reference_from and config.lora.rank:
      errors.append("dpo.reference_from: with LoRA the reference is the base (init_from) "
                    "with the adapters off; leave dpo.reference_from empty")
    if dpo.reference_from and not os.path.exists(dpo.reference_from):
      errors.append(f"dpo.reference_from: no such path {dpo.reference_from!r}")
  if config.task in ("grpo", "ppo"):
    rl_cfg = config.rl
    if not config.init_from:
      errors.append(f"init_from: task={config.task!r} needs the policy to start from")
    if not config.reward.fn and not config.reward.model:
      errors.append("reward.fn / reward.model: set a reward source (e.g. reward.fn=math_answer)")
    if config.reward.fn:
      errors += _reward_fn_errors(config.reward.fn)
    if config.reward.model and not os.path.exists(config.reward.model):
      errors.append(f"reward.model: no such path {config.reward.model!r}")
    if config.task == "grpo" and ok("rl.num_generations") and rl_cfg.num_generations < 2:
      errors.append(f"rl.num_generations={rl_cfg.num_generations}: GRPO needs groups of >= 2")
    if ok("data.batch_size", "rl.num_generations", "rl.minibatches",
          "optimizer.grad_accum_steps"):
      rows = config.data.batch_size * rl_cfg.num_generations
      accum = config.optimizer.grad_accum_steps
      if rows % rl_cfg.minibatches:
        errors.append(f"rl.minibatches={rl_cfg.minibatches} does not divide the "
                      f"{rows} completions of a step (data.batch_size * rl.num_generations)")
      elif (rows // rl_cfg.minibatches) % accum:
        errors.append(f"optimizer.grad_accum_steps={accum} does not divide the "
                      f"{rows // rl_cfg.minibatches} completions of a minibatch")
    if ok("rl.temperature") and not rl_cfg.temperature > 0:
      errors.append(f"rl.temperature={rl_cfg.temperature}: must be > 0 (the policy's "
                    f"log-probs are taken at it)")
  if config.task == "reward":
    spec = config.reward.normalize_on
    if spec == "eval" and not config.data.eval:
      errors.append("reward.normalize_on='eval' but data.eval is empty")
    elif spec and spec != "eval" and not spec.strip().startswith("builtin:"):
      check(lambda: expand_globs(spec, "reward.normalize_on"))

  if (ok("data.seq_len", "model.max_seq_len") and m.family == "gpt2"
      and config.data.seq_len > m.max_seq_len):
    errors.append(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={m.max_seq_len} "
                  f"(learned positions)")

  try:
    sizes = mesh_shape(config, num_devices)
  except ConfigError as e:
    errors.append(str(e))
    sizes = None
  if sizes and ok("data.batch_size", "optimizer.grad_accum_steps"):
    dp = sizes["data"] * sizes["fsdp"]
    accum = config.optimizer.grad_accum_steps
    micro = config.data.batch_size // accum
    if config.data.batch_size % accum:
      errors.append(f"data.batch_size={config.data.batch_size} is not divisible by "
                    f"optimizer.grad_accum_steps={accum}")
    elif micro % dp:
      errors.append(f"data.batch_size={config.data.batch_size} (per microbatch {micro}) is not "
                    f"divisible by the data-parallel size mesh.data*mesh.fsdp={dp}")
    if config.data.batch_size % num_processes:
      errors.append(f"data.batch_size={config.data.batch_size} is not divisible by the "
                    f"{num_processes} processes")
  shards = config.data.shards
  if shards and ok("data.shards", "data.batch_size"):
    if config.task not in ("pretrain", "sft"):
      errors.append(f"data.shards={shards}: only pretrain and sft split their data into "
                    f"shards; leave it 0 for task={config.task!r}")
    elif shards % num_processes or config.data.batch_size % shards:
      errors.append(f"data.shards={shards} must be a multiple of the {num_processes} "
                    f"process(es) and divide data.batch_size={config.data.batch_size}")

  if config.task == "eval":
    if not config.eval.model:
      errors.append("eval.model: empty; name the checkpoint to evaluate (a jaxlm run or a "
                    "Hugging Face directory)")
    elif not os.path.exists(config.eval.model):
      errors.append(f"eval.model: no such path {config.eval.model!r}")
    if not (config.eval.tasks or config.eval.text or config.eval.pairs):
      errors.append("eval.tasks / eval.text / eval.pairs: all empty; nothing to evaluate")
  errors += _eval_path_errors(config.eval)
  for key in ("data.train", "data.eval") if config.task != "eval" else ():
    spec = get_key(config, key)
    if is_prepared(spec):
      pass  # a prepared corpus (tools/prepare_data.py); its sources are checked when read
    elif spec and spec.strip().startswith("builtin:"):
      pass  # generated data (jaxlm.data.sft.BUILTINS), checked when the task builds it
    elif spec and spec.strip().startswith("tfds:"):
      from jaxlm.data.sources import parse_tfds_spec  # pylint: disable=import-outside-toplevel
      check(lambda spec=spec, key=key: parse_tfds_spec(spec, key))
    elif spec:
      check(lambda spec=spec, key=key: expand_globs(spec, key))
  if not config.data.train and config.task != "eval":
    errors.append("data.train: empty; give one or more comma-separated globs")
  if config.data.mixture:
    from jaxlm.data.lm import parse_mixture  # pylint: disable=import-outside-toplevel
    check(lambda: parse_mixture(config.data.mixture))
    if not is_prepared(config.data.train):
      errors.append("data.mixture: set, but data.train is not a prepared corpus (a directory "
                    "with prepared.json), so there are no sources to weigh")
  if config.data.tokenizer and not os.path.isfile(config.data.tokenizer):
    errors.append(f"data.tokenizer: no such file {config.data.tokenizer!r}")
  if config.init_from and not os.path.exists(config.init_from):
    errors.append(f"init_from: no such path {config.init_from!r}")
  return errors


def _eval_path_errors(e) -> list[str]:
  errors = []
  for key in ("tasks", "text", "pairs"):
    spec = e[key].strip()
    if spec and not spec.startswith(("builtin:", "@")):
      try:
        expand_globs(spec, f"eval.{key}")
      except ConfigError as err:
        errors.append(str(err))
  for key in ("reward_model", "baseline", "reference"):
    if e[key] and not e[key].startswith("@") and not os.path.exists(e[key]):
      errors.append(f"eval.{key}: no such path {e[key]!r}")
  return errors


def eval_errors(e) -> list[str]:
  """Problems of an eval section (`@stage` paths are a pipeline's, checked when it runs)."""
  return [one_line(x) for x in _eval_path_errors(e)] + section_errors("eval", e)


def parse_arg(arg: str | None, choices: dict | None = None, **defaults):
  """`"k=v,k2=v2"` (the text after `:` in `--config file.py:ARG`) -> dict over defaults.

  `choices` maps a key to its allowed values; anything else is a ConfigError.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ConfigError(one_line(f"config arg {item!r}: expected one of "
                                 f"{', '.join(f'{k}=...' for k in defaults)}"))
    kind = type(defaults[key])
    if defaults[key] is None or kind is str:
      out[key] = value
    elif kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(one_line(f"config arg {key}={value!r}: must be true or false"))
      out[key] = value.lower() in ("true", "1")
    else:
      try:
        out[key] = kind(value)
      except (TypeError, ValueError):
        raise ConfigError(one_line(f"config arg {key}={value!r}: must be "
                                   f"{'an integer' if kind is int else 'a ' + kind.__name__}")) from None
  for key, allowed in (choices or {}).items():
    if out[key] not in allowed:
      raise ConfigError(one_line(f"config arg {key}={out[key]!r}: must be one of "
                                 f"{', '.join(map(str, allowed))}"))
  return out


def parse_config_flags(argv: list[str], flag_values=None) -> list[str]:
  """absl's parsing of `argv` into `flag_values` (absl's FLAGS by default), where every
  problem is a ConfigError of one line naming the flag, the key or the config file:
  a bad value or an unknown flag (absl's message), an override naming a key the locked
  config lacks (ml_collections raises KeyError/AttributeError), a config file that is
  missing (ml_collections defers that to the config's first use) or whose loading or
  `get_config(ARG)` fails (ml_collections embeds the whole traceback)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections.config_flags.config_flags import (  # pylint: disable=import-outside-toplevel
      ConfigFileFlagParser)
  fv = flags.FLAGS if flag_values is None else flag_values
  try:
    rest = fv(argv)
    for name in list(fv):  # a config file that failed to load raises on first use: its
      # value is ml_collections' _ErrorConfig, which raises on an attribute, not before
      if isinstance(fv[name].parser, ConfigFileFlagParser) and fv[name].present:
        getattr(fv[name].value, "lock", None)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(one_line(_parse_error(e, argv))) from None
  return rest


def parse_flags(argv: list[str]) -> list[str]:
  """`parse_config_flags` for a command line: each problem is printed as one line,
  `config error: ...`, and the exit status is 2. Pass as
  `app.run(main, flags_parser=parse_flags)`."""
  import sys  # pylint: disable=import-outside-toplevel
  try:
    return parse_config_flags(argv)
  except ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)


def _chain(e):
  """`e` and the exceptions it was raised from or while handling, outermost first."""
  seen = []
  while e is not None and e not in seen:
    seen.append(e)
    e = e.__cause__ if e.__cause__ is not None else (
        None if e.__suppress_context__ else e.__context__)
  return seen


def _config_file_load(chain):
  """(flag name, `FILE[:ARG]`) when an exception in `chain` passed through ml_collections'
  loading of a config file; else None."""
  from ml_collections.config_flags.config_flags import (  # pylint: disable=import-outside-toplevel
      ConfigFileFlagParser)
  for exc in chain:
    for frame, _ in traceback.walk_tb(exc.__traceback__):
      if frame.f_code is ConfigFileFlagParser.parse.__code__:
        parser, path = frame.f_locals.get("self"), frame.f_locals.get("path")
        return getattr(parser, "name", "config"), str(path)
  return None


def _override_in_progress(chain) -> str | None:
  """The dotted key of the override ml_collections was resolving when it raised."""
  path = None
  for exc in chain:
    for frame, _ in traceback.walk_tb(exc.__traceback__):
      if "ml_collections" in frame.f_code.co_filename:
        found = frame.f_locals.get("field_path", frame.f_locals.get("override"))
        path = found if isinstance(found, str) else path
  return path


def _parse_error(e, argv) -> str:
  from absl import flags  # pylint: disable=import-outside-toplevel
  chain = _chain(e)
  loading = _config_file_load(chain)
  if loading:
    name, spec = loading
    file = spec.split(":", 1)[0]
    # ml_collections re-raises get_config's error as its own type with the traceback
    # embedded: the innermost ConfigError (or exception) is the one that says what's wrong
    root = next((x for x in reversed(chain) if isinstance(x, ConfigError)), chain[-1])
    if isinstance(root, OSError) and not os.path.isfile(file):
      why = "is a directory, not a config file" if os.path.isdir(file) else "no such file"
      return f"--{name}={spec}: {why}"
    if isinstance(root, ConfigError):
      return f"--{name}={spec}: {root}"
    where = getattr(root, "lineno", None) if isinstance(root, SyntaxError) else None
    for frame, lineno in traceback.walk_tb(root.__traceback__):
      if os.path.abspath(frame.f_code.co_filename) == os.path.abspath(file):
        where = lineno
    text = root.msg if isinstance(root, SyntaxError) else str(root)
    text = text.strip().splitlines()[0] if text.strip() else ""
    return (f"--{name}={spec}: {type(root).__name__}: {text}"
            + (f" (line {where})" if where else ""))
  if isinstance(e, flags.Error):  # a bad value or an unknown flag: absl's message
    return str(e)
  path = _override_in_progress(chain)
  if isinstance(e, (KeyError, AttributeError, TypeError, IndexError)) and (
      path or not isinstance(e, (TypeError, IndexError))):
    # an override naming a key the config lacks: ml_collections nests the key in quotes,
    # sometimes with a "Did you mean" line
    text = str(e).encode().decode("unicode_escape", errors="replace")
    lookup = re.search(r"Attempting to lookup: ([\w.]+)", text)
    path = path or (lookup.group(1) if lookup else None)
    flag_args = [a.split("=")[0] for a in argv[1:] if a.startswith("-")]
    if path and (lookup or isinstance(e, (TypeError, IndexError))):  # a key below a value
      culprit = next((a for a in flag_args if a.endswith("." + path)), f"--config.{path}")
      return (f"{culprit}: the config has no key {path!r} ({path.rsplit('.', 1)[0]} is a "
              f"value, not a section)")
    words = re.findall(r"[A-Za-z0-9_]+", text)
    key = words[0] if words else "?"
    hint = re.search(r'Did you mean "([^"]+)"', text)
    culprits = ([a for a in flag_args if a.endswith("." + path)] if path else []) or [
        a for a in flag_args if "." in a and key in a.split(".")[1:]]
    return (f"{', '.join(culprits) or 'an override'}: the config has no key {key!r}"
            + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))
  return (f"--config.{path}: " if path else "") + f"{type(e).__name__}: {e}"
