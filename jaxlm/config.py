"""Shared config defaults, model shape presets, and validation.

Every knob any task reads exists here with a comment, so a locked config accepts
it on the command line (`--config.optimizer.lr=3e-4`) and rejects unknown keys.
"""

from __future__ import annotations

import glob
import os
import re

import ml_collections


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
  m.remat = "minimal"           # "none" | "minimal" (save projection outputs) | "full"
  m.attention = "auto"          # "auto" | "xla" | "cudnn" | "splash"
  m.logits_chunk = 0            # > 0: the loss takes logits this many positions at a time
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
  c.data.shards = 0             # pretrain, sft: data split into this many shards, a multiple of
                                # the process count: batches (and losses) do not depend on the
                                # process count; 0: one shard a process
  # SFT (task "sft"): records -> chat template -> tokens with a loss mask
  c.data.sft_format = "auto"    # "auto" (by fields) | "alpaca" | "messages" | "prompt_completion" | "text"
  c.data.chat_template = "jaxlm"  # "jaxlm" | "chatml" | "llama3" | "hf" (tokenizer_config.json's)
  c.data.loss_on = "completion"  # "completion" (assistant turns) | "all" tokens
  c.data.packing = True         # pack whole examples into rows (first fit); else pad each
  c.data.truncation = "truncate"  # examples over seq_len: "truncate" | "drop"
  c.data.on_error = "raise"     # bad records: "raise" (file:line) | "skip" (counted)

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
}

_POSITIVE = ("steps", "log_every", "keep_checkpoints", "checkpoint_every", "model.d_model",
             "model.num_layers", "model.num_heads", "model.num_kv_heads", "model.ffn_dim",
             "data.seq_len", "data.batch_size", "optimizer.lr", "optimizer.grad_accum_steps",
             "model.vocab_multiple", "max_skipped_steps", "loss_spike_window")
_NON_NEGATIVE = ("eval_every", "eval_steps", "optimizer.warmup_steps", "optimizer.weight_decay",
                 "optimizer.grad_clip", "loss.z_loss", "model.vocab_size", "model.head_dim",
                 "model.logits_chunk", "peak_tflops", "preemption_grace_s", "loss_spike_factor", "data.prefetch", "data.shards",
                 "model.rope_scaling_factor",
                 "reward.center_coef", "dpo.sft_weight", "rl.kl_coef", "rl.kl_target",
                 "rl.temperature", "rl.top_k", "rl.missing_eos_penalty", "rl.vf_coef",
                 "rl.value_clip", "rl.clip_low", "rl.clip_high")


def get_key(config, dotted):
  """The value at a dotted key (`optimizer.lr`), or None when the config has no such key."""
  node = config
  for part in dotted.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def set_key(config, dotted: str, value) -> None:
  """Set an existing dotted key (`optimizer.lr`); ConfigError naming it when the config
  has no such key. An int given for a float field is stored as a float."""
  *parents, leaf = dotted.split(".")
  node = get_key(config, ".".join(parents)) if parents else config
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(f"no config key {dotted!r}")
  if isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  setattr(node, leaf, value)


def expand_globs(spec: str, key: str) -> list[str]:
  """Comma-separated globs -> sorted file list; error naming `key` if one matches nothing."""
  files = []
  for pattern in [p.strip() for p in spec.split(",") if p.strip()]:
    matched = sorted(f for f in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
    if not matched:
      raise ConfigError(f"{key}: no file matches {pattern!r}")
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


def validate(config, num_devices: int, num_processes: int = 1) -> list[str]:
  """Every problem in `config`, each as one line naming the key. Empty when valid."""
  from jaxlm.data.prepare import is_prepared  # pylint: disable=import-outside-toplevel
  errors = []

  def check(fn):
    try:
      fn()
    except ConfigError as e:
      errors.append(str(e))

  for key, choices in _CHOICES.items():
    value = get_key(config, key)
    if value is not None and value not in choices:
      errors.append(f"{key}={value!r}: must be one of {', '.join(choices)}")
  for key in _POSITIVE:
    value = get_key(config, key)
    if value is not None and not value > 0:
      errors.append(f"{key}={value!r}: must be > 0")
  for key in _NON_NEGATIVE:
    value = get_key(config, key)
    if value is not None and value < 0:
      errors.append(f"{key}={value!r}: must be >= 0")
  if "lora" in config and config.lora.rank:
    if config.lora.rank < 0 or config.lora.alpha <= 0 or not 0 <= config.lora.dropout < 1:
      errors.append(f"lora: rank={config.lora.rank}, alpha={config.lora.alpha}, dropout="
                    f"{config.lora.dropout}: need rank >= 0, alpha > 0, 0 <= dropout < 1")
    if not config.init_from:
      errors.append(f"lora.rank={config.lora.rank} needs init_from: adapters tune a trained "
                    f"base model")
  if get_key(config, "task") == "dpo":
    dpo = config.dpo
    if not dpo.beta > 0:
      errors.append(f"dpo.beta={dpo.beta}: must be > 0")
    if not 0.0 <= dpo.label_smoothing < 0.5:
      errors.append(f"dpo.label_smoothing={dpo.label_smoothing}: must be in [0, 0.5)")
    if not config.init_from:
      errors.append("init_from: task='dpo' needs the model it aligns (a jaxlm run or a "
                    "Hugging Face directory); the policy starts there and, by default, "
                    "the reference is a copy of it")
    if dpo.reference_from and config.lora.rank:
      errors.append("dpo.reference_from: with LoRA the reference is the base (init_from) "
                    "with the adapters off; leave dpo.reference_from empty")
    if dpo.reference_from and not os.path.exists(dpo.reference_from):
      errors.append(f"dpo.reference_from: no such path {dpo.reference_from!r}")
  if get_key(config, "task") in ("grpo", "ppo"):
    rl_cfg = config.rl
    if not config.init_from:
      errors.append(f"init_from: task={config.task!r} needs the policy to start from")
    for key in ("num_generations", "max_new_tokens", "epochs", "minibatches"):
      if not rl_cfg[key] > 0:
        errors.append(f"rl.{key}={rl_cfg[key]}: must be > 0")
    if not config.reward.fn and not config.reward.model:
      errors.append("reward.fn / reward.model: set a reward source (e.g. reward.fn=math_answer)")
    if config.reward.model and not os.path.exists(config.reward.model):
      errors.append(f"reward.model: no such path {config.reward.model!r}")
    if config.task == "grpo" and rl_cfg.num_generations < 2:
      errors.append(f"rl.num_generations={rl_cfg.num_generations}: GRPO needs groups of >= 2")
    rows = config.data.batch_size * rl_cfg.num_generations
    if rows % rl_cfg.minibatches:
      errors.append(f"rl.minibatches={rl_cfg.minibatches} does not divide the "
                    f"{rows} completions of a step (data.batch_size * rl.num_generations)")
    if not 0 < rl_cfg.top_p <= 1:
      errors.append(f"rl.top_p={rl_cfg.top_p}: must be in (0, 1]")
    if not rl_cfg.temperature > 0:
      errors.append(f"rl.temperature={rl_cfg.temperature}: must be > 0 (the policy's "
                    f"log-probs are taken at it)")
    accum = max(config.optimizer.grad_accum_steps, 1)
    if rows % rl_cfg.minibatches == 0 and (rows // rl_cfg.minibatches) % accum:
      errors.append(f"optimizer.grad_accum_steps={accum} does not divide the "
                    f"{rows // rl_cfg.minibatches} completions of a minibatch")
  if get_key(config, "task") == "reward":
    spec = config.reward.normalize_on
    if spec == "eval" and not config.data.eval:
      errors.append("reward.normalize_on='eval' but data.eval is empty")
    elif spec and spec != "eval" and not spec.strip().startswith("builtin:"):
      check(lambda: expand_globs(spec, "reward.normalize_on"))
  if not 0.0 <= config.optimizer.min_lr_ratio <= 1.0:
    errors.append(f"optimizer.min_lr_ratio={config.optimizer.min_lr_ratio}: must be in [0, 1]")
  if not 0.0 < config.optimizer.decay_fraction <= 1.0:
    errors.append(f"optimizer.decay_fraction={config.optimizer.decay_fraction}: must be in (0, 1]")

  m = config.model
  if m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads:
    errors.append(f"model.num_heads={m.num_heads} is not divisible by "
                  f"model.num_kv_heads={m.num_kv_heads}")
  if not m.head_dim and m.num_heads > 0 and m.d_model % m.num_heads:
    errors.append(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads} "
                  f"(set model.head_dim)")
  if (m.head_dim or (m.d_model // max(m.num_heads, 1))) % 2 and m.family == "llama":
    errors.append("model.head_dim must be even for rotary embeddings")
  if m.family == "gpt2" and config.data.seq_len > m.max_seq_len:
    errors.append(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={m.max_seq_len} "
                  f"(learned positions)")

  try:
    sizes = mesh_shape(config, num_devices)
  except ConfigError as e:
    errors.append(str(e))
    sizes = None
  if sizes:
    dp = sizes["data"] * sizes["fsdp"]
    micro = config.data.batch_size // max(config.optimizer.grad_accum_steps, 1)
    if config.data.batch_size % max(config.optimizer.grad_accum_steps, 1):
      errors.append(f"data.batch_size={config.data.batch_size} is not divisible by "
                    f"optimizer.grad_accum_steps={config.optimizer.grad_accum_steps}")
    elif micro % dp:
      errors.append(f"data.batch_size={config.data.batch_size} (per microbatch {micro}) is not "
                    f"divisible by the data-parallel size mesh.data*mesh.fsdp={dp}")
    if config.data.batch_size % num_processes:
      errors.append(f"data.batch_size={config.data.batch_size} is not divisible by the "
                    f"{num_processes} processes")
  shards = config.data.shards
  if shards:
    if get_key(config, "task") not in ("pretrain", "sft"):
      errors.append(f"data.shards={shards}: only pretrain and sft split their data into "
                    f"shards; leave it 0 for task={get_key(config, 'task')!r}")
    elif shards % num_processes or config.data.batch_size % shards:
      errors.append(f"data.shards={shards} must be a multiple of the {num_processes} "
                    f"process(es) and divide data.batch_size={config.data.batch_size}")

  if get_key(config, "task") == "eval":
    if not config.eval.model:
      errors.append("eval.model: empty; name the checkpoint to evaluate (a jaxlm run or a "
                    "Hugging Face directory)")
    elif not os.path.exists(config.eval.model):
      errors.append(f"eval.model: no such path {config.eval.model!r}")
    if not (config.eval.tasks or config.eval.text or config.eval.pairs):
      errors.append("eval.tasks / eval.text / eval.pairs: all empty; nothing to evaluate")
  if "eval" in config:
    errors += eval_errors(config.eval)
  for key in ("data.train", "data.eval") if get_key(config, "task") != "eval" else ():
    spec = get_key(config, key)
    if spec and is_prepared(spec):
      pass  # a prepared corpus (tools/prepare_data.py); its sources are checked when read
    elif spec and spec.strip().startswith("builtin:"):
      pass  # generated data (jaxlm.data.sft.BUILTINS), checked when the task builds it
    elif spec and spec.strip().startswith("tfds:"):
      from jaxlm.data.sources import parse_tfds_spec  # pylint: disable=import-outside-toplevel
      check(lambda spec=spec, key=key: parse_tfds_spec(spec, key))
    elif spec:
      check(lambda spec=spec, key=key: expand_globs(spec, key))
  if (not get_key(config, "data.train") and "data" in config and "train" in config.data
      and get_key(config, "task") != "eval"):
    errors.append("data.train: empty; give one or more comma-separated globs")
  if get_key(config, "data.mixture"):
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


def eval_errors(e) -> list[str]:
  """Problems of an eval section (`@stage` paths are a pipeline's, checked when it runs)."""
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
  for key in ("batch_size", "seq_len", "max_new_tokens"):
    if not e[key] > 0:
      errors.append(f"eval.{key}={e[key]}: must be > 0")
  for key in ("max_tasks", "text_batches", "temperature", "top_k", "show"):
    if e[key] < 0:
      errors.append(f"eval.{key}={e[key]}: must be >= 0")
  if not 0 < e.top_p <= 1:
    errors.append(f"eval.top_p={e.top_p}: must be in (0, 1]")
  return errors


def parse_arg(arg: str | None, choices: dict | None = None, **defaults):
  """`"k=v,k2=v2"` (the text after `:` in `--config file.py:ARG`) -> dict over defaults.

  `choices` maps a key to its allowed values; anything else is a ConfigError.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ConfigError(f"config arg {item!r}: expected one of "
                        f"{', '.join(f'{k}=...' for k in defaults)}")
    out[key] = type(defaults[key])(value) if defaults[key] is not None else value
  for key, allowed in (choices or {}).items():
    if out[key] not in allowed:
      raise ConfigError(f"config arg {key}={out[key]!r}: must be one of {', '.join(allowed)}")
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, where every problem is one line and exit status 2: a bad value,
  an unknown flag, or an override naming a key the locked config lacks (which
  ml_collections raises as KeyError/AttributeError, with a traceback).
  Pass as `app.run(main, flags_parser=parse_flags)`."""
  import sys  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a bad value or an unknown flag: absl's message is one line
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  except (KeyError, AttributeError) as e:
    # ml_collections nests the key in quotes, sometimes with a "Did you mean" line.
    text = str(e).encode().decode("unicode_escape")
    words = re.findall(r"[A-Za-z0-9_]+", text)
    key = words[0] if words else "?"
    hint = re.search(r'Did you mean "([^"]+)"', text)
    culprits = [a.split("=")[0] for a in argv[1:]
                if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    print(f"config error: {', '.join(culprits) or 'an override'}: the config has no key "
          f"{key!r}" + (f" (did you mean {hint.group(1)!r}?)" if hint else ""), file=sys.stderr)
    sys.exit(2)
