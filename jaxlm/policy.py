"""A language model ready to generate: its config, params, tokenizer and chat template,
loaded from a jaxlm run (a LoRA run merged, a PPO run's policy) or a Hugging Face
directory. Used by `python -m jaxlm.sample` and `python -m jaxlm.selfdata`."""

from __future__ import annotations

import dataclasses
import os

from jaxlm import fileio


@dataclasses.dataclass
class Policy:
  """A language model ready to generate: config, params, tokenizer and chat template."""
  model_config: object
  params: dict
  tokenizer: object
  template: object
  path: str


def load(path: str, chat_template: str = "") -> Policy:
  """A jaxlm run or a Hugging Face directory -> Policy (params on the default device)."""
  from jaxlm import hf  # pylint: disable=import-outside-toplevel
  from jaxlm.config import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxlm.data import sft, tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  if hf.is_hf_dir(path):
    cfg, params = hf.load_hf(path)
    folder, default = path, "hf"
    config_path = os.path.join(path, "tokenizer_config.json")
    if not (os.path.isfile(config_path) and "chat_template" in fileio.read_json(config_path)):
      default = "jaxlm"
  else:
    cfg, params, folder, run = hf.load_jaxlm(path)
    default = run.get("data", {}).get("chat_template", "jaxlm")
  tok_path = hf.tokenizer_file(folder)
  if tok_path is None:
    raise ConfigError(f"{path}: no tokenizer.model or tokenizer.json in {folder}")
  tok = tokenizer_lib.load(tok_path)
  template = sft.chat_template(chat_template or default, tok, check=False)
  return Policy(cfg, params, tok, template, path)
