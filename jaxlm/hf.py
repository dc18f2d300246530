"""Hugging Face model directories in and out: config.json + safetensors, never pickles.

    model_config, params = load_hf("path/to/hf_model")
    save_hf(model_config, params, "path/to/out")   # transformers' from_pretrained reads it

Families: the Llama family (model_type llama, mistral, qwen2; tied or untied embeddings;
Llama-3 RoPE scaling) and gpt2. Weights are read tensor by tensor from single or sharded
safetensors files and transposed into jaxlm's layout (see jaxlm.model).
"""

from __future__ import annotations

import contextlib
import os

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
import safetensors.numpy

from jaxlm import fileio, model
from jaxlm.config import model_config, model_errors
from jaxlm.errors import HFError, one_line


LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
# Weight formats jaxlm never reads. Pickle-based ones (torch.save, Meta's consolidated.*.pth,
# joblib) can run code when loaded; the others it just doesn't read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
OTHER_SUFFIXES = {".h5": "a TensorFlow format", ".msgpack": "a Flax format",
                  ".gguf": "a llama.cpp format"}
SAFETENSORS_INDEX = "model.safetensors.index.json"
# The first bytes of a pickle (protocol 2-5) and of torch.save's zip archive (a pickle inside)
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def refused_format(name: str) -> str | None:
  """Why jaxlm never loads a weights file of this name (its format), or None: pickle-based
  formats (`pytorch_model.bin`, `consolidated.00.pth`, `model.pt`, ...) and their index
  files, TensorFlow's .h5, Flax's .msgpack, .gguf."""
  base = name[:-len(".index.json")] if name.endswith(".index.json") else name
  suffix = os.path.splitext(base)[1].lower()
  if suffix in PICKLE_SUFFIXES:
    return "a pickle-based format, which jaxlm never loads"
  if suffix in OTHER_SUFFIXES:
    return f"{OTHER_SUFFIXES[suffix]}, which jaxlm does not read"
  return None


def _refused_file(path: str) -> str | None:
  """A weights file in `path` jaxlm refuses (the first by name), or None."""
  try:
    names = sorted(os.listdir(path))
  except OSError:
    return None
  return next((n for n in names if refused_format(n) and os.path.isfile(os.path.join(path, n))),
              None)


def is_hf_dir(path: str) -> bool:
  """A folder with config.json and weights in a Hugging Face layout: safetensors, or, when
  config.json is a Hugging Face one (it names a `model_type`; a jaxlm run's does not), a
  format jaxlm refuses (so that the refusal, not a "no checkpoint" error, is what's said)."""
  config = os.path.join(path, "config.json")
  if not os.path.isfile(config):
    return False
  if (os.path.isfile(os.path.join(path, "model.safetensors"))
      or os.path.isfile(os.path.join(path, SAFETENSORS_INDEX))):
    return True
  if not _refused_file(path):
    return False
  try:
    return "model_type" in read_json(config)
  except HFError:
    return False


# ---------------------------------------------------------------------------------------
# config.json <-> model config


_MISSING = object()
_KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               dict: "an object", list: "a list", type(None): "null"}


def _kind_name(value) -> str:
  name = _KIND_NAMES.get(type(value), type(value).__name__)
  if isinstance(value, (bool, int, float, str)):  # a scalar is shown; a container only named
    shown = repr(value)
    name += f" ({shown[:40] + '...' if len(shown) > 40 else shown})"
  return name


class _Fields:
  """A config.json object's fields, each read as the type transformers writes: HFError
  naming the file and the field (`rope_scaling.factor`) when one is missing or of another
  type. An optional field that is null takes its default, as transformers does."""

  def __init__(self, values: dict, where: str, prefix: str = ""):
    self.values, self.where, self.prefix = values, where, prefix

  def _error(self, key: str, problem: str) -> HFError:
    return HFError(one_line(f"{self.where}: field {self.prefix + key!r} {problem}"))

  def get(self, key: str, kind: type, default=_MISSING):
    value = self.values.get(key)
    if value is None:
      if default is _MISSING:
        raise self._error(key, "is missing" if key not in self.values else "is null")
      return default
    if kind is float:
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
      value = float(value) if ok else value
    elif kind is int:
      ok = isinstance(value, int) and not isinstance(value, bool)
    else:
      ok = isinstance(value, kind)
    if not ok:
      raise self._error(key, f"is {_kind_name(value)}, not {_KIND_NAMES[kind]}")
    return value

  def sub(self, key: str) -> "_Fields":
    """A nested object (`rope_scaling`), empty when absent or null."""
    return _Fields(self.get(key, dict, {}), self.where, f"{self.prefix}{key}.")


def _rope(f: _Fields) -> tuple[float, _Fields | None, float]:
  """(theta, the scaling fields or None, the local layers' theta or 0) from transformers
  5 `rope_parameters` (one set, or one per layer type as Gemma 3 writes) or 4's
  `rope_theta`, `rope_scaling` and `rope_local_base_freq`."""
  params = f.sub("rope_parameters")
  local = 0.0
  if "full_attention" in params.values:  # per layer type
    local = params.sub("sliding_attention").get("rope_theta", float, 0.0)
    params = params.sub("full_attention")
  local = local or f.get("rope_local_base_freq", float, 0.0)
  theta = params.get("rope_theta", float, None)
  theta = f.get("rope_theta", float, 10000.0) if theta is None else theta
  scaling = params if params.get("rope_type", str, "default") != "default" else f.sub(
      "rope_scaling")
  kind = scaling.get("rope_type", str, None) or scaling.get("type", str, "default")
  return theta, (None if kind == "default" else scaling), local


def model_config_from_hf(hf: dict, where: str = "config.json"):
  """A jaxlm model config (float32 compute, as stored) from a HF config.json dict; HFError
  naming `where` and the field when a field is missing, mistyped or out of range."""
  if not isinstance(hf, dict):
    raise HFError(f"{where}: not a JSON object")
  try:
    m = _model_config_from_hf(_Fields(hf, where), where)
  except HFError:
    raise
  except (TypeError, ValueError, AttributeError) as e:  # a value model_config refuses
    raise HFError(one_line(f"{where}: {e}")) from None
  errors = model_errors(m)
  if errors:
    raise HFError(f"{where}: {errors[0]} (as read from it)")
  return m


_GEMMA = ("gemma2", "gemma3_text")
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _layer_pattern(f: _Fields, kind: str, layers: int, where: str) -> tuple[str, int]:
  """(model.layer_pattern, model.sliding_window): from `layer_types` when config.json
  lists them, else from the family's own fields."""
  window = f.get("sliding_window", int, 0)
  types = f.get("layer_types", list, None)
  if types is not None:
    if len(types) != layers or not all(t in ("sliding_attention", "full_attention")
                                       for t in types):
      raise HFError(one_line(f"{where}: field 'layer_types' must list {layers} of "
                             f"'sliding_attention' or 'full_attention'"))
    local = [t == "sliding_attention" for t in types]
  elif kind == "gemma2":
    local = [i % 2 == 0 for i in range(layers)]
  elif kind == "gemma3_text":
    every = f.get("sliding_window_pattern", int, 0) or f.get("_sliding_window_pattern", int, 6)
    local = [(i + 1) % every != 0 for i in range(layers)]
  elif kind in ("qwen2", "qwen3"):
    first = f.get("max_window_layers", int, layers)
    local = [f.get("use_sliding_window", bool, False) and i >= first for i in range(layers)]
  else:  # mistral, phi3: every layer, when a window is set
    local = [bool(window)] * layers
  if not any(local):
    return "G", 0
  if not window:
    raise HFError(f"{where}: layers are sliding_attention but field 'sliding_window' is not set")
  # The shortest pattern whose repeats give the layers (model.layer_pattern's form).
  return "".join("L" if k else "G" for k in local[:model.period(local)]), window


# long: one reading of every family's config.json fields, each checked as it is read
def _model_config_from_hf(f: _Fields, where: str):
  kind = f.get("model_type", str, None)
  if kind == "gemma3" and "text_config" in f.values:
    raise HFError(f"{where}: model_type 'gemma3' is the image-text model; jaxlm reads its "
                  f"text-only form (gemma3_text, e.g. gemma-3-1b)")
  if kind in LLAMA_TYPES:
    act_key = "hidden_activation" if kind in _GEMMA else "hidden_act"
    act = f.get(act_key, str, "gelu_pytorch_tanh" if kind in _GEMMA else "silu")
    if act not in _ACTIVATIONS:
      raise HFError(f"{where}: {act_key}={act!r}; jaxlm's gated MLP takes silu or "
                    f"gelu_pytorch_tanh")
    if f.get("mlp_bias", bool, False):
      raise HFError(f"{where}: mlp_bias=true is not supported")
    if kind != "qwen2" and f.get("attention_bias", bool, False):
      raise HFError(f"{where}: attention_bias=true (an o_proj bias) is not supported")
    if kind == "phi3" and f.sub("rope_parameters").get("partial_rotary_factor", float, 1.0) != 1:
      raise HFError(f"{where}: partial_rotary_factor < 1 is not supported")
    theta, scaling, local_theta = _rope(f)
    heads = f.get("num_attention_heads", int)
    layers = f.get("num_hidden_layers", int)
    pattern, window = _layer_pattern(f, kind, layers, where)
    gemma = kind in _GEMMA
    m = model_config(
        "tiny", family="llama", vocab_size=f.get("vocab_size", int),
        d_model=f.get("hidden_size", int), num_layers=layers,
        num_heads=heads, num_kv_heads=f.get("num_key_value_heads", int, 0) or heads,
        head_dim=f.get("head_dim", int, 0), ffn_dim=f.get("intermediate_size", int),
        rope_theta=theta, norm_eps=f.get("rms_norm_eps", float, 1e-6),
        qkv_bias=kind == "qwen2",
        tie_embeddings=f.get("tie_word_embeddings", bool, gemma),
        max_seq_len=f.get("max_position_embeddings", int, 2048),
        qk_norm=kind in ("qwen3", "gemma3_text"), norm_plus_one=gemma, post_norms=gemma,
        scale_embeddings=gemma, mlp_activation=_ACTIVATIONS[act],
        query_scale=f.get("query_pre_attn_scalar", float, 0.0) if gemma else 0.0,
        attn_softcap=f.get("attn_logit_softcapping", float, 0.0) if gemma else 0.0,
        final_softcap=f.get("final_logit_softcapping", float, 0.0) if gemma else 0.0,
        sliding_window=window, layer_pattern=pattern,
        rope_local_theta=local_theta if kind == "gemma3_text" else 0.0, hf_architecture=kind)
    if scaling is not None:
      rope_type = scaling.get("rope_type", str, None) or scaling.get("type", str)
      if rope_type not in ("llama3", "linear"):
        raise HFError(f"{where}: rope scaling {rope_type!r} is not supported (llama3 or "
                      f"linear)")
      m.rope_scaling_type = rope_type
      m.rope_scaling_factor = scaling.get("factor", float)
      if rope_type == "llama3":
        m.rope_low_freq_factor = scaling.get("low_freq_factor", float)
        m.rope_high_freq_factor = scaling.get("high_freq_factor", float)
        m.rope_original_max_len = scaling.get("original_max_position_embeddings", int)
  elif kind == "gpt2":
    activation = f.get("activation_function", str, "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
      raise HFError(f"{where}: activation_function={activation!r}; jaxlm's gpt2 uses the "
                    f"tanh GELU (gelu_new)")
    if (f.get("scale_attn_by_inverse_layer_idx", bool, False)
        or f.get("reorder_and_upcast_attn", bool, False)):
      raise HFError(f"{where}: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                    f"are not supported")
    d, heads = f.get("n_embd", int), f.get("n_head", int)
    m = model_config("tiny", family="gpt2", vocab_size=f.get("vocab_size", int), d_model=d,
                     num_layers=f.get("n_layer", int), num_heads=heads, num_kv_heads=heads,
                     head_dim=0, ffn_dim=f.get("n_inner", int, 0) or 4 * d,
                     max_seq_len=f.get("n_positions", int),
                     norm_eps=f.get("layer_norm_epsilon", float, 1e-5), tie_embeddings=True)
  else:
    raise HFError(one_line(f"{where}: model_type {kind!r} is not supported; jaxlm reads "
                           f"{', '.join(LLAMA_TYPES)} and gpt2"))
  m.vocab_multiple = 1
  m.dtype = "float32"
  return m


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                  "phi3": "Phi3ForCausalLM"}
# What an export must reproduce exactly: the architecture, not how jaxlm computes it.
_RUNTIME_KNOBS = ("dtype", "param_dtype", "vocab_multiple", "remat", "attention", "logits_chunk",
                  "layer_loop", "init_std", "hf_architecture")


def hf_architecture(m) -> str:
  """The HF model_type a llama-family model exports as: `model.hf_architecture`, else
  the plainest that holds its options."""
  if m.hf_architecture:
    return m.hf_architecture
  if m.norm_plus_one or m.post_norms or m.scale_embeddings:
    return "gemma3_text" if m.qk_norm else "gemma2"
  if m.qk_norm:
    return "qwen3"
  if m.qkv_bias:
    return "qwen2"
  return "mistral" if m.sliding_window else "llama"


def hf_config_from_model(m, dtype: str) -> dict:
  """The config.json transformers needs to rebuild the model. HFError when the chosen
  architecture cannot hold one of the model's options (read back, it would differ)."""
  if m.family == "gpt2" and (not m.tie_embeddings or m.num_kv_heads != m.num_heads):
    raise HFError("a gpt2 model exports to Hugging Face only with tie_embeddings=True and "
                  "num_kv_heads == num_heads, as GPT-2 itself has")
  # Token ids come from the tokenizer (runs.export_hf adds them); unset, not a family's
  # default that may lie outside this vocabulary.
  common = {"vocab_size": m.vocab_size, "tie_word_embeddings": bool(m.tie_embeddings),
            "dtype": dtype, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
  if m.family == "gpt2":
    return {**common, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_embd": m.d_model, "n_layer": m.num_layers, "n_head": m.num_heads,
            "n_inner": m.ffn_dim, "n_positions": m.max_seq_len,
            "layer_norm_epsilon": m.norm_eps, "activation_function": "gelu_new"}
  kind = hf_architecture(m)
  out = {**common, **_llama_fields(m, kind)}
  mine = _architecture(m.to_dict())
  back = _architecture(model_config_from_hf(out, f"the {kind} config.json").to_dict())
  for key, value in mine.items():
    if back.get(key) != value:
      raise HFError(one_line(f"model.{key}={value!r}: a {kind} config.json cannot hold it "
                             f"(it reads back as {back.get(key)!r}); set "
                             f"model.hf_architecture to a family that has it"))
  return out


def _architecture(m: dict) -> dict:
  """The knobs that change what the model computes, with defaults spelled out."""
  out = {k: v for k, v in m.items() if k not in _RUNTIME_KNOBS}
  out["head_dim"] = out["head_dim"] or out["d_model"] // out["num_heads"]
  if not out["rope_scaling_factor"] > 0:
    out.pop("rope_scaling_type")
  if not (out["rope_scaling_factor"] > 0 and out.get("rope_scaling_type") == "llama3"):
    for k in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"):
      out.pop(k)
  return out


def _llama_fields(m, kind: str) -> dict:
  """config.json's fields for a llama-family model exported as `kind`."""
  rope = {"rope_type": "default", "rope_theta": m.rope_theta}
  if m.rope_scaling_factor > 0 and m.rope_scaling_type == "linear":
    rope = {"rope_type": "linear", "rope_theta": m.rope_theta, "factor": m.rope_scaling_factor}
  elif m.rope_scaling_factor > 0:
    rope = {"rope_type": "llama3", "rope_theta": m.rope_theta, "factor": m.rope_scaling_factor,
            "low_freq_factor": m.rope_low_freq_factor,
            "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_max_len}
  kinds = model.layer_kinds(m)
  out = {"architectures": [_ARCHITECTURES[kind]], "model_type": kind,
         "hidden_size": m.d_model, "intermediate_size": m.ffn_dim,
         "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
         "num_key_value_heads": m.num_kv_heads, "head_dim": model.head_dim(m),
         "rms_norm_eps": m.norm_eps, "max_position_embeddings": m.max_seq_len,
         "rope_parameters": rope, "rope_theta": m.rope_theta,
         "rope_scaling": rope if m.rope_scaling_factor > 0 else None,
         "attention_bias": False, "mlp_bias": False,
         "sliding_window": m.sliding_window or None}
  act = "gelu_pytorch_tanh" if m.mlp_activation == "gelu_tanh" else "silu"
  if kind in _GEMMA:
    scalar = int(m.query_scale) if float(m.query_scale).is_integer() else m.query_scale
    out.update(hidden_activation=act, query_pre_attn_scalar=scalar or None,
               attn_logit_softcapping=m.attn_softcap or None,
               final_logit_softcapping=m.final_softcap or None)
  else:
    out["hidden_act"] = act
  if kind != "mistral" and kind != "phi3":
    out["layer_types"] = ["sliding_attention" if k else "full_attention" for k in kinds]
  if kind in ("qwen2", "qwen3"):
    out.update(use_sliding_window=bool(m.sliding_window),
               max_window_layers=next((i for i, k in enumerate(kinds) if k), m.num_layers))
  if kind == "gemma3_text":
    local = {"rope_type": "default", "rope_theta": m.rope_local_theta or m.rope_theta}
    out.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
               rope_local_base_freq=local["rope_theta"])
  return out


# ---------------------------------------------------------------------------------------
# Tensor names and layouts


def _names(m) -> dict:
  """jaxlm name -> (HF name pattern with {i} for the layer, transform kind); "fused":
  HF tensors that hold several jaxlm ones stacked on their first axis (Phi-3's),
  pattern -> [(jaxlm name, kind, rows)]."""
  if m.family == "gpt2":
    t = {"embed": ("wte.weight", "same"), "pos_embed": ("wpe.weight", "same"),
         "final_norm": ("ln_f.weight", "same"), "final_norm_bias": ("ln_f.bias", "same")}
    layer = {"attn_norm": ("h.{i}.ln_1.weight", "same"), "attn_norm_bias": ("h.{i}.ln_1.bias", "same"),
             "mlp_norm": ("h.{i}.ln_2.weight", "same"), "mlp_norm_bias": ("h.{i}.ln_2.bias", "same"),
             "wo": ("h.{i}.attn.c_proj.weight", "in_heads"), "bo": ("h.{i}.attn.c_proj.bias", "same"),
             "w_up": ("h.{i}.mlp.c_fc.weight", "same"), "b_up": ("h.{i}.mlp.c_fc.bias", "same"),
             "w_down": ("h.{i}.mlp.c_proj.weight", "same"),
             "b_down": ("h.{i}.mlp.c_proj.bias", "same")}
    return {"top": t, "layer": layer, "fused": {}}
  t = {"embed": ("model.embed_tokens.weight", "same"), "final_norm": ("model.norm.weight", "same")}
  if not m.tie_embeddings:
    t["lm_head"] = ("lm_head.weight", "transpose")
  p = "model.layers.{i}."
  layer = {"attn_norm": (p + "input_layernorm.weight", "same"),
           "mlp_norm": (p + "post_attention_layernorm.weight", "same"),
           "wq": (p + "self_attn.q_proj.weight", "out_heads"),
           "wk": (p + "self_attn.k_proj.weight", "out_heads"),
           "wv": (p + "self_attn.v_proj.weight", "out_heads"),
           "wo": (p + "self_attn.o_proj.weight", "in_heads_t"),
           "w_gate": (p + "mlp.gate_proj.weight", "transpose"),
           "w_up": (p + "mlp.up_proj.weight", "transpose"),
           "w_down": (p + "mlp.down_proj.weight", "transpose")}
  if m.qkv_bias:
    layer.update({"bq": (p + "self_attn.q_proj.bias", "heads"),
                  "bk": (p + "self_attn.k_proj.bias", "heads"),
                  "bv": (p + "self_attn.v_proj.bias", "heads")})
  if m.qk_norm:
    layer.update({"q_norm": (p + "self_attn.q_norm.weight", "same"),
                  "k_norm": (p + "self_attn.k_norm.weight", "same")})
  if m.post_norms:  # Gemma's four: HF's post_attention_layernorm is the attention's own
    layer.update({"post_attn_norm": (p + "post_attention_layernorm.weight", "same"),
                  "mlp_norm": (p + "pre_feedforward_layernorm.weight", "same"),
                  "post_mlp_norm": (p + "post_feedforward_layernorm.weight", "same")})
  fused = {}
  if hf_architecture(m) == "phi3":
    H, G, K, F = m.num_heads, m.num_kv_heads, model.head_dim(m), m.ffn_dim
    fused = {p + "self_attn.qkv_proj.weight": [("wq", "out_heads", H * K),
                                                ("wk", "out_heads", G * K),
                                                ("wv", "out_heads", G * K)],
             p + "mlp.gate_up_proj.weight": [("w_gate", "transpose", F), ("w_up", "transpose", F)]}
    for parts in fused.values():
      for name, _, _ in parts:
        del layer[name]
  return {"top": t, "layer": layer, "fused": fused}


def _to_jaxlm(x: np.ndarray, kind: str, shape: tuple) -> np.ndarray:
  """One HF tensor -> jaxlm's layout of `shape` (one layer's shape for layer params)."""
  # torch's (out, in) -> jaxlm's (in, out), then heads split out of the flat side:
  # out_heads [heads*K, D] -> [D, heads, K]; in_heads_t [D, H*K] -> [H, K, D].
  if kind in ("transpose", "out_heads", "in_heads_t"):
    x = x.T
  return np.ascontiguousarray(x.reshape(shape))


def to_hf(x: np.ndarray, kind: str) -> np.ndarray:
  """One jaxlm tensor (one layer's, for layer params) in HF's layout: `_to_jaxlm` undone.
  out_heads [D, H, K] -> [H*K, D]; in_heads_t [H, K, D] -> [D, H*K]; in_heads (GPT-2's
  Conv1D) [H, K, D] -> [H*K, D]; heads [H, K] -> [H*K]; transpose [in, out] -> [out, in]."""
  if kind in ("transpose", "out_heads", "in_heads_t"):
    x = x.reshape(x.shape[0], -1) if kind == "out_heads" else x.reshape(-1, x.shape[-1])
    x = x.T
  elif kind == "in_heads":
    x = x.reshape(-1, x.shape[-1])
  elif kind == "heads":
    x = x.reshape(-1)
  return np.ascontiguousarray(x)


# ---------------------------------------------------------------------------------------
# Reading and writing


def read_json(path: str) -> dict:
  """A JSON object from `path` (through fileio.read_json: cut short, not JSON or nested
  too deeply), or HFError naming the file."""
  try:
    out = fileio.read_json(path)
  except OSError as e:
    raise HFError(one_line(f"{path}: can't read it ({e.strerror or e})")) from None
  except ValueError as e:  # fileio's message names the file
    raise HFError(one_line(str(e))) from None
  if not isinstance(out, dict):
    raise HFError(f"{path}: not a JSON object")
  return out


def _looks_like_safetensors(head: bytes, size: int) -> bool:
  """A safetensors file starts with its JSON header's length (8 bytes, little-endian),
  then the header's `{`. A header of 640 bytes starts with the bytes of a protocol-2
  pickle (0x80 0x02), so the pickle check below must not look at such a file."""
  return len(head) >= 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def open_safetensors(file: str):
  """A safetensors file opened for reading (nothing in it is executed: a JSON header and
  raw tensor bytes), or HFError naming it: a pickle renamed .safetensors, a truncated
  or foreign file."""
  try:
    with open(file, "rb") as f:
      head = f.read(9)
      size = os.fstat(f.fileno()).st_size
  except OSError as e:
    raise HFError(one_line(f"{file}: can't read it ({e.strerror or e})")) from None
  if head.startswith(_PICKLE_MAGIC) and not _looks_like_safetensors(head, size):
    raise HFError(f"{file}: not a safetensors file but a pickle (torch.save), which jaxlm "
                  f"never loads: convert it to safetensors first")
  try:
    return safe_open(file, framework="numpy")
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError, OSError, ...)
    raise HFError(one_line(f"{file}: not a readable safetensors file ({e})")) from None


class _Tensors:
  """Lazy access to the tensors of single or sharded safetensors files."""

  def __init__(self, path: str):
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
      weight_map = read_json(index).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map or not all(
          isinstance(f, str) for f in weight_map.values()):
        raise HFError(f"{index}: no weight_map of tensor names to files")
      for f in set(weight_map.values()):
        if os.path.basename(f) != f or not f.endswith(".safetensors"):
          raise HFError(one_line(f"{index}: weight_map names {f!r}; jaxlm reads only "
                                 f".safetensors files beside the index"))
        if not os.path.isfile(os.path.join(path, f)):
          raise HFError(one_line(f"{index}: names {f!r}, which is not in {path}"))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
      weight_map = None
    else:
      found = _refused_file(path)
      raise HFError(f"{path}: no model.safetensors or {SAFETENSORS_INDEX}"
                    + (f"; {found} is {refused_format(found)}: convert it to "
                       f"safetensors first" if found else ""))
    files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
    self.handles = {f: open_safetensors(os.path.join(path, f)) for f in files}
    self.where = {}
    for f, h in self.handles.items():
      for k in h.keys():
        self.where[k] = f
    self.path = path

  def get(self, name: str) -> np.ndarray:
    for candidate in (name, "transformer." + name, name.removeprefix("transformer.")):
      if candidate in self.where:
        file = os.path.join(self.path, self.where[candidate])
        try:
          return self.handles[self.where[candidate]].get_tensor(candidate)
        except Exception as e:  # pylint: disable=broad-except  (a truncated file, a dtype numpy lacks)
          raise HFError(one_line(f"{file}: can't read tensor {candidate!r} ({e})")) from None
    raise HFError(f"{self.path}: tensor {name!r} is missing")


# long: every family's tensors, one parameter at a time (stacked layers, fused, GPT-2's)
def load_hf(path: str, param_dtype: str | None = None, place=None):
  """(model_config, params) from a Hugging Face model directory: numpy arrays, or with
  `place`, each parameter given to `place(path, array)` (path: ("embed",) or ("layers",
  "wq")) as soon as it is whole, and its result kept: placed on its devices, the host
  holds one parameter at a time rather than the whole model."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise HFError(f"{path}: no config.json; not a Hugging Face model directory")
  hf = read_json(config_path)
  m = model_config_from_hf(hf, config_path)
  tensors = _Tensors(path)
  fields = _Fields(hf, config_path)
  stored = fields.get("dtype", str, None) or fields.get("torch_dtype", str, "float32")
  m.param_dtype = param_dtype or ("bfloat16" if stored == "bfloat16" else "float32")
  dtype = np.dtype(m.param_dtype) if m.param_dtype != "bfloat16" else np.dtype(ml_dtypes.bfloat16)
  shapes = model.param_shapes_and_axes(m)
  names = _names(m)
  place = place or (lambda _, x: x)
  L = m.num_layers

  def convert(hf_name, kind, shape, x=None):
    x = tensors.get(hf_name) if x is None else x
    try:
      return _to_jaxlm(x, kind, shape)
    except ValueError:  # the tensor's size disagrees with config.json's shape
      raise HFError(f"{path}: tensor {hf_name!r} has shape {tuple(x.shape)}, which does not "
                    f"fit the {tuple(shape)} that config.json implies") from None

  def stack(name):  # the [L, ...] parameter, filled layer by layer
    return np.empty(shapes["layers"][name][0], dtype)

  params, layers = {}, {}
  for name, (hf_name, kind) in names["top"].items():
    params[name] = place((name,), convert(hf_name, kind, shapes[name][0]).astype(dtype))
  for name, (pattern, kind) in names["layer"].items():
    if m.family == "gpt2" and name in ("wq", "wk", "wv", "bq", "bk", "bv"):
      continue
    out = stack(name)
    for i in range(L):
      out[i] = convert(pattern.format(i=i), kind, out.shape[1:])
    layers[name] = place(("layers", name), out)
  for pattern, parts in names["fused"].items():  # Phi-3: [q; k; v] and [gate; up] rows
    rows = sum(r for _, _, r in parts)
    outs = {name: stack(name) for name, _, _ in parts}
    for i in range(L):
      x = tensors.get(pattern.format(i=i))
      if x.shape != (rows, m.d_model):
        raise HFError(f"{path}: tensor {pattern.format(i=i)!r} has shape {tuple(x.shape)}, "
                      f"which does not fit the ({rows}, {m.d_model}) that config.json implies")
      start = 0
      for name, kind, r in parts:
        outs[name][i] = convert(pattern, kind, outs[name].shape[1:], x[start:start + r])
        start += r
    layers.update({name: place(("layers", name), x) for name, x in outs.items()})
  if m.family == "gpt2":  # c_attn holds q, k, v side by side: [D, 3D] and [3D]
    H, K = m.num_heads, model.head_dim(m)
    outs = {name: stack(name) for name in ("wq", "wk", "wv", "bq", "bk", "bv")}
    for i in range(L):
      cw = tensors.get(f"h.{i}.attn.c_attn.weight")
      cb = tensors.get(f"h.{i}.attn.c_attn.bias")
      if cw.shape != (m.d_model, 3 * H * K) or cb.shape != (3 * H * K,):
        raise HFError(f"{path}: tensors 'h.{i}.attn.c_attn.*' have shapes "
                      f"{tuple(cw.shape)} and {tuple(cb.shape)}, which do not fit the "
                      f"({m.d_model}, {3 * H * K}) that config.json implies")
      for part, (w, b) in enumerate((("wq", "bq"), ("wk", "bk"), ("wv", "bv"))):
        outs[w][i] = cw[:, part * H * K:(part + 1) * H * K].reshape(-1, H, K)
        outs[b][i] = cb[part * H * K:(part + 1) * H * K].reshape(H, K)
    layers.update({name: place(("layers", name), x) for name, x in outs.items()})
  params["layers"] = layers
  return m, params


def save_hf(m, params, path: str, *, max_shard_bytes: int = 5 * 2**30):
  """Write `params` of model config `m` as a Hugging Face model directory at `path`, whole
  or not at all (see `staged_export`): `path` must be empty, absent or an earlier export."""
  with staged_export(path, "huggingface") as folder:
    write_hf(m, params, folder, max_shard_bytes)


def write_hf(m, params, folder: str, max_shard_bytes: int, extra_config: dict | None = None):
  """config.json and safetensors for `params` into `folder` (a staging folder)."""
  params = jax.tree.map(np.asarray, jax.device_get(params))
  names = _names(m)
  out = {}
  prefix = "transformer." if m.family == "gpt2" else ""
  for name, (hf_name, kind) in names["top"].items():
    out[prefix + hf_name] = to_hf(params[name], kind)
  for name, (pattern, kind) in names["layer"].items():
    for i in range(m.num_layers):
      out[prefix + pattern.format(i=i)] = to_hf(params["layers"][name][i], kind)
  for pattern, parts in names["fused"].items():
    for i in range(m.num_layers):
      out[pattern.format(i=i)] = np.concatenate([to_hf(params["layers"][name][i], kind)
                                                 for name, kind, _ in parts])
  if m.family == "gpt2":
    for i in range(m.num_layers):
      lp = {k: params["layers"][k][i] for k in ("wq", "wk", "wv", "bq", "bk", "bv")}
      D = lp["wq"].shape[0]
      out[f"transformer.h.{i}.attn.c_attn.weight"] = np.concatenate(
          [lp[w].reshape(D, -1) for w in ("wq", "wk", "wv")], axis=1)
      out[f"transformer.h.{i}.attn.c_attn.bias"] = np.concatenate(
          [lp[b].reshape(-1) for b in ("bq", "bk", "bv")])
  dtype = str(next(iter(out.values())).dtype)
  config = hf_config_from_model(m, dtype)  # first: a model it refuses writes nothing
  _write_shards(out, folder, max_shard_bytes, safetensors.numpy.save_file)
  fileio.atomic_write_json(os.path.join(folder, "config.json"), {**config, **(extra_config or {})})


def _write_shards(tensors: dict, path: str, max_shard_bytes: int, save_file):
  shards, current, size = [], {}, 0
  for name, x in tensors.items():
    if current and size + x.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = x
    size += x.nbytes
  shards.append(current)

  def save(shard, fname):
    file = os.path.join(path, fname)
    # safetensors writes through a private temporary file (mode 0600) renamed into place:
    # the shard gets the mode any new file gets here (0666 less the umask) once written.
    with open(file, "wb"):
      pass
    mode = os.stat(file).st_mode & 0o777
    try:
      save_file(shard, file, metadata={"format": "pt"})
    except OSError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (SafetensorError: a full disk, ...)
      raise OSError(one_line(f"{fname}: {e}")) from None
    os.chmod(file, mode)

  if len(shards) == 1:
    save(shards[0], "model.safetensors")
    return
  weight_map = {}
  for n, shard in enumerate(shards, 1):
    fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
    save(shard, fname)
    weight_map.update(dict.fromkeys(shard, fname))
  fileio.atomic_write_json(os.path.join(path, SAFETENSORS_INDEX),
                           {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
                            "weight_map": weight_map})


# ---------------------------------------------------------------------------------------
# Whole directories: HF model dir <-> jaxlm checkpoint (tools/convert_hf.py)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenizer.vocab", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


def tokenizer_file(folder: str) -> str | None:
  """The tokenizer in a folder: for a Hugging Face directory its canonical
  tokenizer.json (added tokens, chat markers) first, for a jaxlm run the SentencePiece
  model it trained first; None when there is neither."""
  names = (("tokenizer.json", "tokenizer.model") if is_hf_dir(folder)
           else ("tokenizer.model", "tokenizer.json"))
  return next((os.path.join(folder, n) for n in names
               if os.path.isfile(os.path.join(folder, n))), None)


def copy_tokenizer(src: str, dst: str) -> list[str]:
  """The tokenizer files of `src` copied into `dst`, each atomically; their names."""
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)):
      fileio.atomic_copy(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied


# ---------------------------------------------------------------------------------------
# Exports, written whole or not at all (fileio.replaced_folder): into a staging folder
# beside the target, renamed into place; a previous export (its marker lists every file
# it wrote) is replaced whole, anything else non-empty is refused.

EXPORT_MARKER = fileio.EXPORT_MARKER
_WHAT = {"huggingface": "a Hugging Face export", "jaxlm": "a jaxlm import"}


def check_export_target(path: str, kind: str) -> None:
  """HFError (one line naming `path`) unless `path` may receive an export of `kind`."""
  try:
    fileio.check_replaceable(path, kind, _WHAT[kind])
  except fileio.FolderError as e:
    raise HFError(str(e)) from None


@contextlib.contextmanager
def staged_export(path: str, kind: str):
  """A staging folder to write an export of `kind` ("huggingface" or "jaxlm") into; it
  replaces `path` whole when the block ends without an error (HFError, nothing changed,
  when `path` holds something else)."""
  try:
    with fileio.replaced_folder(path, kind, _WHAT[kind]) as folder:
      yield folder
  except fileio.FolderError as e:
    raise HFError(str(e)) from None
