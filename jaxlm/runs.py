"""What a path holds, and loading it: the one place that tells a jaxlm run (pretrain, SFT,
DPO, RL: a LoRA run merged into its base, a PPO run's `{policy, critic}`), a reward run
and a Hugging Face directory apart.

    params = load_params(path, like)        # any of them, as the arrays `like` describes
    lm = load_lm(path)                      # a language model ready to generate
    rm = load_reward_model(path)            # a reward run ready to score
    export_hf(run, out); import_hf(hf_dir, out)

`checkpoint` reads and writes orbax checkpoints and `hf` Hugging Face formats; neither
knows about the other or about runs. Everything that takes a user's path to weights
(`init_from`, `dpo.reference_from`, `reward.model`, `eval.model`, tools/) comes here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

from jaxlm import (checkpoint, console, fileio, hf, hf_tokenizer, lora, model, reward_model,
                   sharding)
from jaxlm.config import base_config, frozen_model, model_config
from jaxlm.data import sft, tokenizer as tokenizer_lib
from jaxlm.errors import CheckpointError, ConfigError, HFError, error_detail, one_line


def find_workdir(params_dir: str) -> str | None:
  """The folder holding config.json: the step's workdir (…/checkpoints/<step>/params)."""
  here = os.path.abspath(params_dir)
  for _ in range(4):
    here = os.path.dirname(here)
    if os.path.isfile(os.path.join(here, "config.json")):
      return here
  return None


def load_params(path: str, like_params) -> dict:
  """Parameters from a jaxlm checkpoint or a Hugging Face model directory, placed like
  `like_params` (shape, dtype and sharding)."""
  if hf.is_hf_dir(path):
    abstract = checkpoint.abstract(like_params)

    def put(where, x):  # onto its devices as soon as it is read: one on the host at a time
      like = abstract
      for key in where:
        like = like.get(key) if isinstance(like, dict) else None
      if like is None or x.shape != like.shape:
        raise ConfigError(f"init_from: {path} has a parameter {'/'.join(where)} of shape "
                          f"{x.shape} where the model config wants "
                          f"{None if like is None else like.shape}")
      # Waited for, so the host copy is gone before the next parameter is read.
      return jax.block_until_ready(jax.device_put(x.astype(like.dtype, copy=False),
                                                  like.sharding))
    dtypes = {str(x.dtype) for x in jax.tree.leaves(abstract)}
    stacked = dtypes.pop() if len(dtypes) == 1 and not dtypes - {"float32", "bfloat16"} else None
    _, params = hf.load_hf(path, param_dtype=stacked, place=put)
    def keys(tree):
      return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    missing = keys(abstract) - keys(params)
    if missing:
      raise ConfigError(f"init_from: {path} has no parameter {sorted(missing)[0]} that the "
                        f"model config wants")
    return params
  return checkpoint.restore_params(path, like_params)


def pin(workdir: str, name: str, source: str) -> str:
  """The concrete weights `source` names (a HF directory, or the step folder of a jaxlm
  run's latest checkpoint), written to `<workdir>/<name>` at a run's first start and read
  back ever after: a resume or an export uses the same weights even if the source run
  has moved on. Process 0 writes; every process reads. A pin whose source differs from
  `source` is replaced while the workdir has no checkpoint, and is an error after."""
  path = os.path.join(workdir, name)
  if jax.process_index() == 0 and os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      pinned = json.load(f)
    was = pinned.get("source", pinned.get("init_from"))
    if was != source:
      if checkpoint.steps_in(os.path.join(workdir, "checkpoints")):
        raise ConfigError(f"{path}: this run's checkpoints belong to weights from {was!r}, "
                          f"but the config now says {source!r}; use a new workdir")
      os.remove(path)  # no step was trained on the old pin: take the new source
  if jax.process_index() == 0 and not os.path.isfile(path):
    base = (os.path.abspath(source) if hf.is_hf_dir(source)
            else os.path.dirname(checkpoint.find_params_dir(source)))
    os.makedirs(workdir, exist_ok=True)
    fileio.atomic_write_json(path, {"base": base, "source": source})
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"pin {name}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)["base"]


def lora_base(workdir: str, init_from: str) -> str:
  """The base a LoRA run trains on, pinned in `<workdir>/lora_base.json` at its first
  start, so a resume or an export uses that same base even if the base run has moved on."""
  return pin(workdir, "lora_base.json", init_from)


# ---------------------------------------------------------------------------------------
# jaxlm runs as language models


def load_jaxlm(jaxlm_path: str):
  """A jaxlm workdir, checkpoints folder or step folder -> (model config, params, its
  workdir, the run's config as a dict), the latest step unless a step folder is given.
  A LoRA run's adapters come merged into its base."""
  params_dir = checkpoint.find_params_dir(jaxlm_path)
  workdir = find_workdir(params_dir)
  if workdir is None:
    raise HFError(f"{jaxlm_path}: no config.json in it or above it; can't tell the model shape")
  config_path = os.path.join(workdir, "config.json")
  run_config = hf.read_json(config_path)
  if run_config.get("task") == "reward":
    raise HFError(f"{jaxlm_path}: a reward model (a scalar head, no output projection); "
                  f"load it with jaxlm.runs.load_reward_model")
  if not isinstance(run_config.get("model"), dict):
    raise HFError(f"{config_path}: no 'model' section; not a jaxlm run's config")
  try:
    m = model_config("tiny", **run_config["model"])
  except (ConfigError, TypeError, ValueError, AttributeError, KeyError) as e:
    raise HFError(one_line(f"{config_path}: its model section is not a jaxlm model "
                           f"config ({e})")) from None
  like = jax.eval_shape(lambda r: model.init(m, r), jax.random.PRNGKey(0))
  lora_cfg = run_config.get("lora") or {}

  def restore(policy_like):  # a PPO run keeps {"policy", "critic"}: the policy is the model
    if run_config.get("task") != "ppo":
      return checkpoint.restore_params(os.path.dirname(params_dir), policy_like)
    critic_like = jax.eval_shape(lambda r: reward_model.init(m, r), jax.random.PRNGKey(0))
    return checkpoint.restore_params(os.path.dirname(params_dir),
                                     {"policy": policy_like, "critic": critic_like})["policy"]

  try:
    if lora_cfg.get("rank", 0) > 0:  # adapters only: merge them into the run's base
      lora_cfg = ml_collections.ConfigDict(lora_cfg)
      adapters_like = jax.eval_shape(lambda r: lora.init(m, lora_cfg, r), jax.random.PRNGKey(0))
      adapters = restore(adapters_like)
      base = load_params(lora_base(workdir, run_config["init_from"]), like)
      params = lora.merge(base, adapters, lora_cfg)
    else:
      params = restore(like)
  except (ConfigError, CheckpointError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (orbax raises bare Exceptions)
    detail = re.split(r" \[tensorstore_spec|\. See full TensorStore", error_detail(e))[0]
    raise HFError(one_line(f"{os.path.dirname(params_dir)}: can't restore this checkpoint "
                           f"({detail[:300]})")) from None
  return m, params, workdir, run_config


@dataclasses.dataclass
class LanguageModel:
  """A language model ready to generate: config, params, tokenizer and chat template."""
  model_config: object
  params: dict
  tokenizer: object
  template: object
  path: str


def load_lm(path: str, chat_template: str = "") -> LanguageModel:
  """A jaxlm run or a Hugging Face directory -> LanguageModel (params on the default
  device), for tools/sample.py, tools/selfdata.py and evaluation."""
  if hf.is_hf_dir(path):
    cfg, params = hf.load_hf(path)
    folder, default = path, "hf"
    config_path = os.path.join(path, "tokenizer_config.json")
    if not (os.path.isfile(config_path) and "chat_template" in fileio.read_json(config_path)):
      default = "jaxlm"
  else:
    cfg, params, folder, run = load_jaxlm(path)
    default = run.get("data", {}).get("chat_template", "jaxlm")
  tok_path = hf.tokenizer_file(folder)
  if tok_path is None:
    raise ConfigError(f"{path}: no tokenizer.model or tokenizer.json in {folder}")
  tok = tokenizer_lib.load(tok_path)
  template = sft.chat_template(chat_template or default, tok, check=False)
  return LanguageModel(frozen_model(cfg), params, tok, template, path)


# ---------------------------------------------------------------------------------------
# Reward runs


def is_reward_checkpoint(path: str) -> bool:
  """Whether a jaxlm checkpoint holds reward-model parameters (a head)."""
  if hf.is_hf_dir(path):
    return False
  return any(name.startswith("['head']") for name, _, _ in checkpoint.describe(path)["params"])


def reward_init_loader(cfg, sharder):
  """init_from for a reward model (the reward task, PPO's critic): a reward run's
  parameters as they are, or a language model's (jaxlm or Hugging Face) as the backbone,
  with the fresh head kept."""
  def load(path: str, params):
    if is_reward_checkpoint(path):
      return load_params(path, params)
    full = jax.eval_shape(lambda r: model.init(cfg, r), jax.random.PRNGKey(0))
    lm = load_params(path, sharder.placed(model.param_axes(cfg), full))
    lm.pop("lm_head", None)  # the head replaces the output projection
    return {"backbone": lm, "head": params["head"]}
  return load


def load_reward_model(path: str, *, mesh: dict | None = None) -> reward_model.RewardModel:
  """A reward run's workdir (or a checkpoint under it) -> RewardModel, on this
  process's devices (a data x fsdp mesh over all of them unless `mesh` says otherwise)."""
  workdir = find_workdir(checkpoint.find_params_dir(path))
  if workdir is None:
    raise ConfigError(f"reward model {path}: no config.json above its checkpoint")
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    run = json.load(f)
  if run.get("task") != "reward":
    raise ConfigError(f"reward model {path}: {workdir} is a {run.get('task')!r} run, not a "
                      f"reward model")
  cfg = model_config("tiny", **run["model"])  # keys added since that run take their defaults
  tok_path = hf.tokenizer_file(workdir)
  if tok_path is None:
    raise ConfigError(f"reward model {path}: no tokenizer in {workdir}")
  tok = tokenizer_lib.load(tok_path)
  template = sft.chat_template(run["data"].get("chat_template", "jaxlm"), tok)
  c = base_config()
  c.mesh.update(mesh or {"data": 1, "fsdp": -1, "tensor": 1})
  sharder = sharding.Sharder(sharding.make_mesh(sharding.mesh_shape(c, jax.device_count())),
                             c.sharding.rules)
  abstract = jax.eval_shape(lambda r: reward_model.init(cfg, r), jax.random.PRNGKey(0))
  params = load_params(path, sharder.placed(reward_model.param_axes(cfg), abstract))
  normalization = None
  norm_path = os.path.join(workdir, reward_model.NORMALIZATION_FILE)
  if os.path.isfile(norm_path):
    with open(norm_path, encoding="utf-8") as f:
      normalization = json.load(f)
    step = checkpoint.step_of(path)
    if normalization.get("step") != step:  # computed for other weights: not applied
      console.warning(f"{norm_path} is for step {normalization.get('step')}, not the loaded "
                      f"step {step}: rewards are not normalized")
      normalization = None
  return reward_model.RewardModel(params, frozen_model(cfg), tok, template, run["data"].get("seq_len", 1024),
                                  sharder, normalization)


# ---------------------------------------------------------------------------------------
# Whole directories: HF model dir <-> jaxlm run (tools/convert_hf.py)


def import_hf(hf_dir: str, out: str) -> str:
  """A HF model directory -> a jaxlm directory that `init_from` takes:
  `out/config.json` (its model section), `out/checkpoints/0/params`, and the tokenizer;
  written whole or not at all, like an export (`hf.staged_export`)."""
  hf.check_export_target(out, "jaxlm")  # before the (long) read
  m, params = hf.load_hf(hf_dir)
  with hf.staged_export(out, "jaxlm") as folder:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(folder, "checkpoints", "0", "params"), params)
    fileio.atomic_write_json(os.path.join(folder, "config.json"),
                             {"model": m.to_dict(), "converted_from": os.path.abspath(hf_dir)})
    hf.copy_tokenizer(hf_dir, folder)
  return out


def export_hf(jaxlm_path: str, out: str) -> str:
  """A jaxlm workdir, checkpoints folder or step folder -> a HF model directory
  (its latest step unless a step folder is given) that transformers and vLLM load as it
  is, written whole or not at all (`hf.staged_export`): weights, config.json, and the
  run's tokenizer as Hugging Face files (`_export_tokenizer`). A LoRA run's adapters are
  merged into its base (its init_from)."""
  hf.check_export_target(out, "huggingface")  # before the (long) restore
  m, params, workdir, run_config = load_jaxlm(jaxlm_path)
  token_ids = _token_ids(workdir)
  with hf.staged_export(out, "huggingface") as folder:
    hf.write_hf(m, params, folder, 5 * 2**30, extra_config=token_ids)
    _export_tokenizer(workdir, folder, run_config, m)
  return out


def _token_ids(workdir: str) -> dict:
  """bos/eos/pad ids for the exported config.json, from the run's tokenizer, so that
  generation in transformers stops where the model learned to."""
  for name in ("tokenizer.json", "tokenizer.model"):
    if os.path.isfile(os.path.join(workdir, name)):
      tok = tokenizer_lib.load(os.path.join(workdir, name))
      return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  return {}


def _export_tokenizer(workdir: str, folder: str, run_config: dict, m) -> None:
  """The run's tokenizer files into the export. A Hugging Face tokenizer (tokenizer.json:
  an imported model's, or data.tokenizer's) keeps its own files as they are, plus a
  generation_config.json when it has none; a SentencePiece model gains the files
  transformers needs to use it without sentencepiece (`hf_tokenizer`)."""
  copied = hf.copy_tokenizer(workdir, folder)
  template = (run_config.get("data") or {}).get("chat_template") or (  # an import has no data
      "hf" if _has_chat_template(workdir) else "jaxlm")
  if "tokenizer.json" in copied:
    if "generation_config.json" not in copied:
      tok = tokenizer_lib.load(os.path.join(workdir, "tokenizer.json"))
      hf_tokenizer.write_generation_config(folder, tok, template, m.vocab_size)
  elif "tokenizer.model" in copied:
    tok = tokenizer_lib.load(os.path.join(workdir, "tokenizer.model"))
    hf_tokenizer.write_sentencepiece(folder, tok, template, vocab_size=m.vocab_size,
                                     max_len=m.max_seq_len)


def _has_chat_template(workdir: str) -> bool:
  """Whether the tokenizer_config.json in `workdir` holds a chat template."""
  path = os.path.join(workdir, "tokenizer_config.json")
  return os.path.isfile(path) and "chat_template" in hf.read_json(path)
