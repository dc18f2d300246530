"""Shared config defaults, model shape presets, and validation.

Every knob any task reads is declared once in `_KNOBS`, with its default, its rule and
a one-line description, so a locked config accepts it on the command line
(`--config.optimizer.lr=3e-4`) and rejects unknown keys; `describe()` lists them for docs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import numbers
import os
import re
from typing import NamedTuple

import ml_collections

from jaxlm.errors import ConfigError, one_line


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
    # The shapes of Qwen3-1.7B, Gemma-2-2B and Gemma-3-1B (their config.json files).
    "qwen3_1_7b": dict(d_model=2048, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                       ffn_dim=6144, vocab_size=151936, tie_embeddings=True, qk_norm=True,
                       rope_theta=1000000.0, max_seq_len=40960, hf_architecture="qwen3"),
    "gemma2_2b": dict(d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256,
                      ffn_dim=9216, vocab_size=256000, tie_embeddings=True, norm_plus_one=True,
                      post_norms=True, mlp_activation="gelu_tanh", scale_embeddings=True,
                      query_scale=256.0, attn_softcap=50.0, final_softcap=30.0,
                      sliding_window=4096, layer_pattern="LG", max_seq_len=8192,
                      hf_architecture="gemma2"),
    "gemma3_1b": dict(d_model=1152, num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256,
                      ffn_dim=6912, vocab_size=262144, tie_embeddings=True, norm_plus_one=True,
                      post_norms=True, qk_norm=True, mlp_activation="gelu_tanh",
                      scale_embeddings=True, query_scale=256.0, sliding_window=512,
                      layer_pattern="LLLLLG", rope_theta=1000000.0, rope_local_theta=10000.0,
                      max_seq_len=32768, hf_architecture="gemma3_text"),
}

# The device mesh's axes, outermost first (jaxlm.sharding builds meshes of them).
MESH_AXES = ("data", "fsdp", "tensor")

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


@dataclasses.dataclass(frozen=True)
class Unranged:
  """The rule of a number that has no interval in `_KNOBS`, in words: it is checked
  elsewhere (the mesh sizes, against the device count) or any finite number will do."""
  text: str

  def __str__(self):
    return self.text


class _Section:
  """The default of a knob that is a section: a ConfigDict holding the knobs under it."""

  def __repr__(self):
    return "SECTION"


SECTION = _Section()


class Knob(NamedTuple):
  """One config key, declared once: its dotted name, default, rule and what it does.

  `rule` is a tuple of allowed values (gathered in `_CHOICES`), an interval such as
  "(0, inf)" or "[0, 1)" (`_RANGES`), an `Unranged`, or None (strings, paths, bools and
  sections, where no rule applies here)."""
  key: str
  default: object
  rule: tuple | str | Unranged | None
  description: str


def _section(key: str, description: str) -> Knob:
  return Knob(key, SECTION, None, description)


# Every knob of base_config, in its order. Keys under "model." are model_config's
# defaults, before a shape preset (base_config's model section is the "tiny" preset's).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # model.dtype's choices

_KNOBS = (
    Knob("task", "pretrain", None,
         "what to run: pretrain | sft | reward | dpo | grpo | ppo | eval | pipeline "
         "(jaxlm.tasks' registry checks it)"),
    Knob("steps", 1000, "(0, inf)", "optimizer steps to train for"),
    Knob("seed", 0, "[0, inf)", "random seed of initialization, data order and sampling"),
    Knob("log_every", 10, "(0, inf)", "steps between logged metrics"),
    Knob("eval_every", 200, "[0, inf)", "steps between evaluations; 0 disables evaluation"),
    Knob("eval_steps", 10, "[0, inf)", "batches per evaluation"),
    Knob("eval_on_start", False, None,
         "also evaluate the initial parameters, at step 0 of a fresh run (with eval_every)"),
    Knob("checkpoint_every", 200, "(0, inf)",
         "steps between checkpoints; one is also written at the end"),
    Knob("keep_checkpoints", 3, "(0, inf)", "the newest checkpoints kept (older ones deleted)"),
    Knob("async_checkpointing", True, None, "write checkpoints while training goes on"),
    Knob("preemption_grace_s", 60.0, "[0, inf)",
         "on SIGTERM the final checkpoint should be written within this many seconds "
         "(warned if not)"),
    Knob("nan_policy", "stop", ("stop", "skip"),
         'a non-finite loss or gradient: "stop" (dump the step, then stop) | "skip" (no update)'),
    Knob("max_skipped_steps", 10, "(0, inf)",
         'nan_policy "skip": this many skipped updates in a row stop the run'),
    Knob("loss_spike_factor", 3.0, "[0, inf)",
         "log an event when a logged loss exceeds this many times the running mean; "
         "0: off, else > 1"),
    Knob("loss_spike_window", 20, "(0, inf)", "logged losses in loss_spike_factor's running mean"),
    Knob("init_from", "", None,
         "start from these weights: a jaxlm workdir or checkpoint, or a Hugging Face model "
         "directory; empty: random initialization"),
    Knob("peak_tflops", 0.0, "[0, inf)",
         "per-device peak TFLOP/s for MFU; 0: look it up by device kind"),
    Knob("progress", "auto", ("auto", "bar", "log"),
         'progress display: "auto" (a bar on a terminal, else log lines) | "bar" | "log"'),

    _section("logging", "where metrics go besides metrics.jsonl and TensorBoard"),
    Knob("logging.wandb_project", "", None,
         "a Weights & Biases project: the run's scalars and resolved config go there too; "
         "empty: off"),
    Knob("logging.wandb_entity", "", None, "the W&B entity (team or user); empty: yours"),
    Knob("logging.wandb_mode", "", ("", "online", "offline"),
         '"offline": written under WORKDIR/wandb for `wandb sync` later, no network; '
         '"": W&B\'s own setting (WANDB_MODE, else online)'),

    _section("mesh", "device mesh sizes per axis; their product is the device count"),
    Knob("mesh.data", 1, Unranged("> 0, or -1 (checked against the device count)"),
         "pure data parallelism (parameters replicated)"),
    Knob("mesh.fsdp", -1, Unranged("> 0, or -1 (checked against the device count)"),
         "data parallelism with sharded parameters; -1: fill the devices left"),
    Knob("mesh.tensor", 1, Unranged("> 0, or -1 (checked against the device count)"),
         "tensor (model) parallelism"),

    _section("sharding", "how arrays' logical axes map onto the mesh"),
    Knob("sharding.rules", DEFAULT_RULES, None,
         "ordered (logical axis, mesh axes or None) pairs; see DEFAULT_RULES"),

    _section("model", 'the architecture: model_config("tiny") (defaults, then a preset)'),
    Knob("model.family", "llama", ("llama", "gpt2"),
         '"llama" (RMSNorm, RoPE, SwiGLU, GQA) | "gpt2" (LayerNorm, learned positions, GELU)'),
    Knob("model.vocab_size", 0, "[0, inf)",
         "vocabulary size; 0: the tokenizer's, padded to vocab_multiple"),
    Knob("model.vocab_multiple", 128, "(0, inf)",
         "pad the vocabulary to a multiple of this (even sharding, MXU tiles)"),
    Knob("model.d_model", 128, "(0, inf)", "width of the residual stream"),
    Knob("model.num_layers", 4, "(0, inf)", "transformer blocks"),
    Knob("model.num_heads", 4, "(0, inf)", "query heads"),
    Knob("model.num_kv_heads", 4, "(0, inf)",
         "key and value heads; fewer than num_heads (dividing it): grouped-query attention"),
    Knob("model.head_dim", 0, "[0, inf)", "width of each head; 0: d_model // num_heads"),
    Knob("model.ffn_dim", 512, "(0, inf)", "hidden width of the feed-forward block"),
    Knob("model.max_seq_len", 2048, "(0, inf)",
         "gpt2 only: rows of the learned position table (the longest sequence)"),
    Knob("model.rope_theta", 10000.0, "(0, inf)", "RoPE's base of the rotation frequencies"),
    Knob("model.rope_scaling_factor", 0.0, "[0, inf)",
         "> 0: Llama-3 RoPE scaling by this factor, shaped by the three knobs below; 0: off"),
    Knob("model.rope_low_freq_factor", 1.0, "(0, inf)",
         "Llama-3 scaling: wavelengths over rope_original_max_len / this are scaled fully"),
    Knob("model.rope_high_freq_factor", 4.0, "(0, inf)",
         "Llama-3 scaling: wavelengths under rope_original_max_len / this are left as they are"),
    Knob("model.rope_original_max_len", 8192, "(0, inf)",
         "Llama-3 scaling: the context length the model was pretrained at"),
    Knob("model.norm_eps", 1e-6, "(0, 1)", "epsilon of RMSNorm or LayerNorm"),
    Knob("model.qkv_bias", False, None, "biases on q, k and v (Qwen2-style)"),
    Knob("model.tie_embeddings", False, None,
         "share the input embedding with the output projection"),
    Knob("model.init_std", 0.02, "(0, inf)", "standard deviation of the initial weights"),
    Knob("model.dtype", "bfloat16", COMPUTE_DTYPES, "compute dtype"),
    Knob("model.param_dtype", "float32", ("float32", "bfloat16"),
         "storage dtype of parameters and optimizer state"),
    Knob("model.remat", "minimal", ("none", "minimal", "full"),
         'activations recomputed for the backward pass: "none" | "minimal" (projections and '
         'attention saved) | "full"'),
    Knob("model.attention", "auto", ("auto", "xla", "cudnn", "splash"),
         'attention kernel; "auto": cudnn on GPU (xla in float32), splash on TPU, else xla'),
    Knob("model.logits_chunk", 0, "[0, inf)",
         "> 0: the loss computes logits this many positions at a time (less memory); 0: at once"),
    Knob("model.layer_loop", "auto", ("auto", "scan", "unroll"),
         '"scan" | "unroll" the layers; "auto": unroll when every device holds the whole '
         "weights (no fsdp or tensor sharding), else scan"),
    Knob("model.qk_norm", False, None,
         "RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma 3)"),
    Knob("model.norm_plus_one", False, None,
         "norms scale by (1 + weight), weights starting at 0 (Gemma)"),
    Knob("model.post_norms", False, None,
         "a norm on each attention and MLP output before the residual add (Gemma 2/3)"),
    Knob("model.mlp_activation", "silu", ("silu", "gelu_tanh"),
         'the llama family\'s gated MLP: "silu" (SwiGLU) | "gelu_tanh" (GeGLU, Gemma)'),
    Knob("model.scale_embeddings", False, None,
         "input embeddings times sqrt(d_model), rounded to the compute dtype (Gemma)"),
    Knob("model.query_scale", 0.0, "[0, inf)",
         "> 0: attention scores scaled by query_scale ** -0.5 (Gemma's query_pre_attn_scalar); "
         "0: head_dim ** -0.5"),
    Knob("model.attn_softcap", 0.0, "[0, inf)",
         "> 0: attention scores pass through cap * tanh(s / cap) (Gemma 2); 0: off"),
    Knob("model.final_softcap", 0.0, "[0, inf)",
         "> 0: output logits pass through cap * tanh(z / cap) (Gemma 2); 0: off"),
    Knob("model.sliding_window", 0, "[0, inf)",
         "> 0: local layers (layer_pattern L) attend to this many positions, their own "
         "included (Mistral, Gemma's local layers)"),
    Knob("model.layer_pattern", "G", None,
         'each layer global (G) or local (L, sliding_window), the pattern repeated over the '
         'layers: "G" all global, "L" all local, "LG" Gemma 2, "LLLLLG" Gemma 3'),
    Knob("model.rope_local_theta", 0.0, "[0, inf)",
         "> 0: local layers' RoPE base, unscaled (Gemma 3); 0: as the global layers"),
    Knob("model.rope_scaling_type", "llama3", ("llama3", "linear"),
         'how rope_scaling_factor > 0 scales RoPE: "llama3" (by wavelength) | "linear" '
         "(every frequency divided by the factor)"),
    Knob("model.hf_architecture", "", ("", "llama", "mistral", "qwen2", "qwen3", "gemma2",
                                        "gemma3_text", "phi3"),
         'the Hugging Face model_type an export writes; "": llama (qwen2 with qkv_bias), '
         "gpt2 for gpt2; set by an import"),

    _section("data", "training and evaluation data, the tokenizer, batches"),
    Knob("data.train", "", None,
         "training data: globs, a prepared corpus directory, or tfds:NAME[:VERSION]:SPLIT"),
    Knob("data.eval", "", None, "evaluation data, the same forms; empty disables evaluation"),
    Knob("data.tfds_data_dir", "", None, "where TFDS datasets are prepared; empty: TFDS's default"),
    Knob("data.mixture", "", None,
         'a prepared corpus\'s source weights, "name=weight,..."; empty: its recorded weights'),
    Knob("data.on_exhausted", "repeat", ("repeat", "stop"),
         'training data used up: "repeat" (a new epoch, reshuffled) | "stop" (end the run)'),
    Knob("data.format", "auto", ("auto", "text", "jsonl"),
         'file format: "auto" (by extension) | "text" | "jsonl"'),
    Knob("data.text_field", "text", None, "the JSONL field holding the document"),
    Knob("data.text_split", "file", ("file", "paragraph"),
         'text files: "file" (one document each) | "paragraph" (split at blank lines)'),
    Knob("data.tokenizer", "", None, "a SentencePiece .model; empty: train one into the workdir"),
    Knob("data.tokenizer_vocab_size", 4096, "(0, inf)",
         "vocabulary size of a tokenizer trained into the workdir"),
    Knob("data.tokenizer_sample_chars", 4_000_000, "(0, inf)",
         "characters of training text such a tokenizer learns from"),
    Knob("data.seq_len", 256, "(0, inf)", "tokens per row"),
    Knob("data.batch_size", 16, "(0, inf)",
         "global batch per step, in sequences (reward, dpo: records; grpo, ppo: prompts)"),
    Knob("data.shuffle", True, None, "shuffle the training data"),
    Knob("data.prefetch", 2, "[0, inf)", "batches prepared ahead in a background thread"),
    Knob("data.shards", 0, "[0, inf)",
         "pretrain, sft: the data splits into this many shards (a multiple of the process "
         "count dividing batch_size), so batches, losses and checkpoints are the same on any "
         "process count dividing it; 0: gcd(batch_size, lcm(8, processes))"),
    Knob("data.sft_format", "auto", ("auto", "alpaca", "messages", "prompt_completion", "text"),
         'the layout of SFT records: "auto" (by their fields) or one of the others'),
    Knob("data.chat_template", "jaxlm", ("jaxlm", "chatml", "llama3", "hf"),
         'how chats become text; "hf": the one in tokenizer_config.json'),
    Knob("data.loss_on", "completion", ("completion", "all"),
         'SFT tokens in the loss: "completion" (assistant turns) | "all"'),
    Knob("data.packing", True, None,
         "pack whole examples into rows (first fit); False: one padded example per row"),
    Knob("data.truncation", "truncate", ("truncate", "drop"),
         'examples over their length limit (seq_len): "truncate" | "drop"'),
    Knob("data.on_error", "raise", ("raise", "skip"),
         'bad records: "raise" (naming file:line) | "skip" (counted)'),
    Knob("data.max_record_bytes", 1 << 24, "(0, inf)",
         "a document, line or record over this many bytes is `too_long` (handled per "
         "data.on_error), which bounds memory"),

    _section("optimizer", "AdamW and its learning-rate schedule"),
    Knob("optimizer.lr", 3e-4, "(0, inf)", "peak learning rate"),
    Knob("optimizer.schedule", "cosine", ("cosine", "linear", "constant", "wsd"),
         'the decay after warmup; "wsd": warmup, stable, decay'),
    Knob("optimizer.warmup_steps", 100, "[0, inf)", "steps of linear warmup to lr"),
    Knob("optimizer.decay_fraction", 0.2, "(0, 1]", "wsd: the final fraction of steps that decays"),
    Knob("optimizer.min_lr_ratio", 0.1, "[0, 1]", "the final lr is lr * min_lr_ratio"),
    Knob("optimizer.b1", 0.9, "[0, 1)", "Adam's decay rate of the gradient mean"),
    Knob("optimizer.b2", 0.95, "[0, 1)", "Adam's decay rate of the squared-gradient mean"),
    Knob("optimizer.eps", 1e-8, "(0, inf)", "Adam's epsilon, added to the update's denominator"),
    Knob("optimizer.weight_decay", 0.1, "[0, inf)", "decoupled (AdamW) weight decay"),
    Knob("optimizer.decay_embeddings", False, None, "apply weight decay to embeddings too"),
    Knob("optimizer.decay_norms_and_biases", False, None,
         "apply weight decay to norm scales and biases too"),
    Knob("optimizer.grad_clip", 1.0, "[0, inf)", "clip gradients to this global norm; 0: off"),
    Knob("optimizer.grad_accum_steps", 1, "(0, inf)",
         "microbatches per step (data.batch_size is split into them)"),

    _section("loss", "extra loss terms"),
    Knob("loss.z_loss", 0.0, "[0, inf)",
         "coefficient of log(Z)^2, which keeps the softmax normalizer Z near 1"),

    _section("lora", "low-rank adapters over a frozen init_from base"),
    Knob("lora.rank", 0, "[0, inf)", "adapter rank; 0: off (train every weight)"),
    Knob("lora.alpha", 16.0, "(0, inf)", "the adapters' update is scaled by alpha / rank"),
    Knob("lora.dropout", 0.0, "[0, 1)", "dropout on the adapters' input"),
    Knob("lora.targets", "(wq|wk|wv|wo|w_gate|w_up|w_down)$", None,
         "a regex over layers/<name>: the weights that get adapters"),

    _section("reward", 'task "reward" (Bradley-Terry on preference pairs); the RL reward'),
    Knob("reward.center_coef", 0.0, "[0, inf)",
         "adds coef * (r_chosen + r_rejected)^2 per pair, keeping rewards centered on 0"),
    Knob("reward.normalize_on", "", None,
         'after training, rewards get mean 0 and std 1 on this set: "eval" (data.eval) or '
         "preference-file globs; empty: off"),
    Knob("reward.fn", "", None,
         'RL: reward functions, "name[=weight],..." of built-ins or package.module:function'),
    Knob("reward.model", "", None, "RL: a jaxlm reward run scoring completions"),
    Knob("reward.model_weight", 1.0, Unranged("any finite number"),
         "RL: the weight of reward.model's scores in the summed reward"),

    _section("rl", 'tasks "grpo" and "ppo" (data.batch_size: prompts per step)'),
    Knob("rl.num_generations", 4, "(0, inf)", "completions per prompt (GRPO's group size G)"),
    Knob("rl.max_new_tokens", 64, "(0, inf)", "the longest completion, in tokens"),
    Knob("rl.rollout_rows", 0, "[0, inf)",
         "completions decoding at once; a finished row takes the next waiting one "
         "(continuous batching); 0: all of a step's at once"),
    Knob("rl.max_staleness", 0, "[0, 1]",
         "1: step n+1's rollouts are generated while step n's update runs, from the weights "
         "before it (a lag of one update, corrected by truncated importance sampling); 0: "
         "synchronous"),
    Knob("rl.is_cap", 2.0, "[1, inf)",
         "max_staleness 1: the importance weight pi_current / pi_rollout is truncated here"),
    Knob("rl.temperature", 1.0, "[0, inf)",
         "sampling temperature; the trainer's log-probs use it too"),
    Knob("rl.top_k", 0, "[0, inf)", "sample among the k likeliest tokens; 0: all"),
    Knob("rl.top_p", 1.0, "(0, 1]",
         "sample among the likeliest tokens holding this much probability; 1: all"),
    Knob("rl.epochs", 1, "(0, inf)", "passes over each rollout batch"),
    Knob("rl.minibatches", 1, "(0, inf)", "optimizer updates per pass"),
    Knob("rl.clip_low", 0.2, "[0, 1)",
         "the policy ratio is clipped to [1 - clip_low, 1 + clip_high]"),
    Knob("rl.clip_high", 0.2, "[0, inf)", "the upper side of that clip"),
    Knob("rl.kl_coef", 0.04, "[0, inf)",
         "weight of the KL to the reference; GRPO: 0 drops the reference"),
    Knob("rl.kl_estimator", "k3", ("k1", "k3"),
         'PPO: "k1" (a penalty in the reward) | "k3" (a loss term); GRPO always uses k3'),
    Knob("rl.kl_target", 0.0, "[0, inf)",
         "PPO: > 0 adapts kl_coef toward this KL per token; 0: kl_coef stays"),
    Knob("rl.advantage_scale", "group", ("group", "batch", "none"),
         'GRPO: advantages divided by the "group" or "batch" std, or "none"'),
    Knob("rl.std_ddof", 0, "[0, 1]",
         "1: GRPO's std of the rewards and PPO's whitening Bessel-corrected, as TRL's; 0: "
         "the plain std"),
    Knob("rl.loss_agg", "sequence", ("sequence", "token", "constant"),
         'how token losses combine: "sequence" mean | "token" mean (DAPO) | "constant" '
         "(Dr. GRPO)"),
    Knob("rl.missing_eos_penalty", 0.0, "[0, inf)",
         "subtracted from the score of completions that end without EOS"),
    Knob("rl.gamma", 1.0, "[0, 1]", "PPO: GAE's discount"),
    Knob("rl.lam", 0.95, "[0, 1]", "PPO: GAE's lambda"),
    Knob("rl.vf_coef", 0.1, "[0, inf)", "PPO: weight of the value loss"),
    Knob("rl.value_clip", 0.2, "[0, inf)",
         "PPO: new values are clipped to within this of the rollout's values"),
    Knob("rl.whiten_rewards", False, None, "PPO: whiten the per-token rewards of each batch"),
    Knob("rl.critic_from", "", None,
         "PPO: where the value head starts (a reward run or an LM); empty: init_from"),

    _section("dpo", 'task "dpo": direct preference optimization and its relatives'),
    Knob("dpo.loss", "sigmoid", ("sigmoid", "robust", "ipo", "hinge"),
         '"sigmoid" (DPO, cDPO) | "robust" | "ipo" | "hinge"'),
    Knob("dpo.beta", 0.1, "(0, inf)", "strength of the implicit KL to the reference"),
    Knob("dpo.label_smoothing", 0.0, "[0, 0.5)",
         "sigmoid, robust: the assumed share of flipped labels"),
    Knob("dpo.length_normalize", False, None,
         "divide each answer's log-probs (policy and reference) by its token count before the "
         "loss, as TRL does for ipo; false: sums"),
    Knob("dpo.reference", "copy", ("copy", "precomputed", "none"),
         '"copy" (frozen weights; with LoRA the base, adapters off) | "precomputed" (one pass '
         'first) | "none" (reference-free)'),
    Knob("dpo.reference_from", "", None, "the reference's weights; empty: init_from"),
    Knob("dpo.sft_weight", 0.0, "[0, inf)",
         "adds weight * the per-token NLL of the chosen response (RPO)"),

    _section("eval", 'task "eval", tools/eval.py and pipeline stages'),
    Knob("eval.model", "", None,
         "the checkpoint: a jaxlm run (any task) or a Hugging Face directory"),
    Knob("eval.tasks", "", None, "prompt records with an `answer` (e.g. gsm8k_test.jsonl)"),
    Knob("eval.max_tasks", 256, "[0, inf)", "only the first N tasks (and pairs); 0: all"),
    Knob("eval.max_new_tokens", 64, "(0, inf)", "the longest completion, in tokens"),
    Knob("eval.temperature", 1.0, "[0, inf)",
         "temperature of the sampled accuracy and KL samples; 0 skips them"),
    Knob("eval.top_k", 0, "[0, inf)", "sample among the k likeliest tokens; 0: all"),
    Knob("eval.top_p", 1.0, "(0, 1]",
         "sample among the likeliest tokens holding this much probability; 1: all"),
    Knob("eval.seed", 0, "[0, inf)", "sampling seed"),
    Knob("eval.batch_size", 64, "(0, inf)", "rows per generation or perplexity batch"),
    Knob("eval.text", "", None, "held-out text for perplexity (globs or builtin:...)"),
    Knob("eval.text_batches", 8, "[0, inf)", "perplexity over at most this many batches"),
    Knob("eval.seq_len", 256, "(0, inf)", "perplexity row length, in tokens"),
    Knob("eval.pairs", "", None, "reward models: held-out preference pairs"),
    Knob("eval.reward_model", "", None, "a reward run judging greedy completions (reward_mean)"),
    Knob("eval.baseline", "", None, "another evaluation's folder: win_rate against its samples"),
    Knob("eval.reference", "", None, "a model to measure kl_to_reference against"),
    Knob("eval.chat_template", "", ("", "jaxlm", "chatml", "llama3", "hf"),
         "empty: the run's data.chat_template (hf for Hugging Face directories)"),
    Knob("eval.show", 4, "[0, inf)", "sample completions kept in eval.json"),
    Knob("eval.lm_eval_tasks", "", None,
         "lm-evaluation-harness tasks, comma-separated, run beside the rest (the eval extra)"),
    Knob("eval.lm_eval_include", "", None, "a folder of lm_eval task YAML files"),
    Knob("eval.lm_eval_limit", 0, "[0, inf)", "the first N documents of each lm_eval task; 0: all"),
    Knob("eval.lm_eval_num_fewshot", -1, "[-1, inf)",
         "few-shot examples per lm_eval prompt; -1: each task's own"),
    Knob("eval.lm_eval_dtype", "", ("", *COMPUTE_DTYPES),
         "compute dtype of the lm_eval tasks; empty: the model's own"),
)


def _set(node, key: str, default) -> None:
  setattr(node, key, ml_collections.ConfigDict() if default is SECTION else default)


def model_config(preset: str = "tiny", **overrides) -> ml_collections.ConfigDict:
  """The model section: defaults, then a shape preset, then overrides."""
  if preset not in MODEL_PRESETS:
    raise ConfigError(f"model preset {preset!r}: must be one of {', '.join(MODEL_PRESETS)}")
  m = ml_collections.ConfigDict()
  for knob in _KNOBS:
    if knob.key.startswith("model."):
      _set(m, knob.key[len("model."):], knob.default)
  for k, v in {**MODEL_PRESETS[preset], **overrides}.items():
    setattr(m, k, v)
  return m


def _model_knobs() -> list[Knob]:
  return [k for k in _KNOBS if k.key.startswith("model.")]


def _model_to_dict(self) -> dict:
  return dataclasses.asdict(self)


# What jitted code receives: the model section, frozen and hashable (a static argument,
# a cache key), its fields and defaults those of the model.* knobs above. Build one with
# `frozen_model` once the config is resolved (architecture, vocabulary) and validated.
ModelConfig = dataclasses.make_dataclass(
    "ModelConfig", [(k.key[len("model."):], type(k.default), dataclasses.field(default=k.default))
                    for k in _model_knobs()],
    frozen=True, namespace={"to_dict": _model_to_dict, "__module__": __name__,
                            "__doc__": "The model section, frozen: see `frozen_model`."})


def frozen_model(m) -> ModelConfig:
  """`m` (a model ConfigDict, a dict, or a ModelConfig) as a ModelConfig; ConfigError
  naming the key for one that is not a model setting."""
  if isinstance(m, ModelConfig):
    return m
  values = m.to_dict() if isinstance(m, ml_collections.ConfigDict) else dict(m)
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  for key in values:
    if key not in known:
      raise ConfigError(f"model.{key}: not a model setting (known: {', '.join(sorted(known))})")
  return ModelConfig(**values)


def check_compute_dtype(dtype: str, key: str) -> None:
  """ConfigError naming `key` unless `dtype` is empty or one of model.dtype's choices."""
  if dtype and dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"{key}={dtype!r}: one of {', '.join(COMPUTE_DTYPES)}")


def compute_in(m, dtype: str, key: str) -> ModelConfig:
  """`m` frozen, computing in `dtype` instead of its own when `dtype` is given
  (`check_compute_dtype`): how a sampler or an evaluator runs a model in float32 to
  compare with another implementation."""
  check_compute_dtype(dtype, key)
  frozen = frozen_model(m)
  return dataclasses.replace(frozen, dtype=dtype) if dtype else frozen


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every task, built from `_KNOBS`. Configs under configs/ start here."""
  c = ml_collections.ConfigDict()
  for knob in _KNOBS:
    *parents, leaf = knob.key.split(".")
    if knob.key == "model":
      c.model = model_config("tiny")
    elif parents[:1] != ["model"]:
      _set(get_key(c, ".".join(parents)) if parents else c, leaf, knob.default)
  return c


def describe() -> list[Knob]:
  """Every key of base_config in its order, for docs: Knob(key, default, rule,
  description), the default being base_config's (SECTION for a section)."""
  c = base_config()
  return [knob if knob.default is SECTION else knob._replace(default=get_key(c, knob.key))
          for knob in _KNOBS]


_CHOICES = {knob.key: knob.rule for knob in _KNOBS if isinstance(knob.rule, tuple)}

# Every numeric field of base_config has a range: > 0, >= 0, or a narrower interval (the
# Unranged ones excepted). Every float must also be finite (no key gives inf or nan a
# meaning), and every integer must fit in 32 bits (JAX's default integer).
_RANGES = {  # interval notation: "[0, 1)" holds 0 but not 1
    knob.key: knob.rule for knob in _KNOBS if isinstance(knob.rule, str)}
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


def structure_errors(config) -> tuple[list[str], list[str], set]:
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


def range_errors(config, errors: list, bad: set) -> None:
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
  if ok("model.layer_pattern", "model.sliding_window"):
    pattern = m.layer_pattern
    if not (isinstance(pattern, str) and pattern and set(pattern) <= {"L", "G"}):
      errors.append(f"model.layer_pattern={pattern!r}: a string of L (local) and G (global), "
                    f'e.g. "G", "LG"')
    elif ("L" in pattern) != (m.sliding_window > 0):
      errors.append(f"model.layer_pattern={pattern!r} with model.sliding_window="
                    f"{m.sliding_window}: local layers (L) need a window > 0, and a window "
                    f"needs local layers")
  if ok("model.family") and m.family == "gpt2":
    llama_only = [k for k in ("qk_norm", "norm_plus_one", "post_norms", "scale_embeddings")
                  if m[k]] + (["mlp_activation"] if m.mlp_activation != "silu" else [])
    if llama_only:
      errors.append(f"model.{llama_only[0]}: the llama family's option; gpt2 has its own "
                    f"fixed shape")
  return errors


def length_errors(config, ok=lambda *keys: True) -> list[str]:
  """The sequence length against the model's (gpt2's learned positions): checked when a
  config is validated and again when a task runs, since the model's shape may come from
  `init_from` (a pipeline stage's is known only once the stage before it has trained)."""
  m = config.model
  if (ok("data.seq_len", "model.max_seq_len") and m.family == "gpt2"
      and config.data.seq_len > m.max_seq_len):
    return [f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={m.max_seq_len} "
            f"(learned positions)"]
  return []


def schema_errors(config, bad: set | None = None) -> list[str]:
  """The problems `config` shows by itself, each one line naming the key: unknown,
  missing or mistyped keys first (when there are any, nothing else is checked: every
  later rule reads base_config's keys and types); then non-finite or too-large numbers,
  choices, ranges, the sharding rules, lora.targets' regex and the model's shape rules.
  Files, devices and each task's own rules are `jaxlm.validate`'s. `bad`, when given,
  receives every key reported; when it holds some after the call with no shape error,
  rules across those keys were skipped (they would compare values already wrong)."""
  bad = set() if bad is None else bad
  shape_errors, errors, named = structure_errors(config)
  bad.update(named)
  if shape_errors:
    bad.add("*")  # keys or types are wrong: no rule below can read them
    return [one_line(e) for e in shape_errors + errors]
  range_errors(config, errors, bad)
  errors += _rules_errors(config.sharding.rules)
  try:
    re.compile(config.lora.targets)
  except (re.error, ValueError) as e:
    errors.append(f"lora.targets={config.lora.targets!r}: not a regular expression ({e})")
  errors += _model_shape_errors(config.model, lambda *keys: not bad.intersection(keys))
  return [one_line(e) for e in errors]


def section_errors(name: str, section, rules=None) -> list[str]:
  """The problems of one section alone (`NAME.KEY=...`, one line each), for a section
  read from elsewhere (a model's from a Hugging Face config.json, an eval's from
  tools/eval.py's flags): its keys and types, then ranges and choices, then
  `rules(section, ok)` across keys (`ok(*keys)`: none of them is reported already)."""
  c = base_config()
  c[name] = section
  shape_errors, errors, bad = structure_errors(c)
  errors = [e for e in shape_errors + errors if e.startswith(f"{name}.")]
  if not errors:
    range_errors(c, errors, bad)
    errors = [e for e in errors if e.startswith(f"{name}.")]
    errors += rules(section, lambda *keys: not bad.intersection(keys)) if rules else []
  return [one_line(e) for e in errors]


def model_errors(m) -> list[str]:
  """The problems of a model section alone: `section_errors` and the shape rules."""
  return section_errors("model", m, _model_shape_errors)


def load_module(path: str, name: str):
  """The Python file at `path`, run as a module called `name` (config, sweep and
  estimate files are not in a package). Its exceptions propagate."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_beside(file: str, name: str):
  """The config file `name`.py in the folder of `file` (a config file's `__file__`), as
  a module: how one config builds on another (configs/ is not a package)."""
  return load_module(os.path.join(os.path.dirname(os.path.abspath(file)), name + ".py"), name)


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
