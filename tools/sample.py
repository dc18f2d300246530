"""Sample from a model: `python tools/sample.py --model DIR [--prompt TEXT] [--chat]`.

  python tools/sample.py --model runs/tiny --prompt "def parse(" --max_new_tokens 64
  python tools/sample.py --model runs/sft_tiny --chat --temperature 0 --prompt "Name a prime."
  python tools/sample.py --model path/to/hf_model --chat    # interactive, multi-turn
  python tools/sample.py --model runs/tiny --prompt "def" --temperature 0 --dtype float32

DIR is a jaxlm run (any step folder of it; a LoRA run comes merged) or a Hugging Face
model directory. Without --chat the prompt is continued as plain text; with --chat it is
a user turn rendered with the chat template, and without --prompt the session is
interactive and multi-turn (each reply joins the history). jaxlm.sample does the work,
with jaxlm.generate, the engine RL rollouts use.
"""

import sys
from typing import NoReturn

from absl import app, flags, logging

from jaxlm import config, runs, sample
from jaxlm.errors import ConfigError, DataError


_MODEL = flags.DEFINE_string("model", None, "A jaxlm run or a Hugging Face model directory.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch). "
                                    "Without it and with --chat: an interactive session.")
_CHAT = flags.DEFINE_bool("chat", False, "Render prompts as user turns with the chat template.")
_TEMPLATE = flags.DEFINE_string("chat_template", "", "jaxlm | chatml | llama3 | hf; default: "
                                "the run's data.chat_template, or hf for a HF directory with one.")
_SYSTEM = flags.DEFINE_string("system", "", "A system turn before the conversation (--chat).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set with this much mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", None, list(config.COMPUTE_DTYPES), "Compute dtype; "
                           "default: the model's own (a run's model.dtype, bfloat16 unless it "
                           "set another; float32 for a HF directory).")
flags.mark_flag_as_required("model")


def fail(e: Exception) -> NoReturn:
  """The error as one line on stderr; exit 2."""
  print(f"error: {e}", file=sys.stderr)
  sys.exit(2)


def chat_ids(sampler, turns):
  """The conversation's prompt ids, or None after saying why the template refused this
  conversation; a template that can't render at all ends the command."""
  try:
    return sampler.chat_ids(turns)
  except ConfigError as e:  # the template itself (the Jinja sandbox refused it)
    fail(e)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return None


def complete_prompts(sampler, system: list, prompts: list[str]):
  """Each --prompt's completion (the prompt and its continuation, without --chat), one
  batch, separated by `---` lines when there are several."""
  if _CHAT.value:
    ids = [chat_ids(sampler, system + [("user", p)]) for p in prompts]
    if any(i is None for i in ids):  # every refused prompt said why first
      sys.exit(2)
  else:
    ids = [sampler.text_ids(p) for p in prompts]
  for p, text in zip(prompts, sampler.complete(ids)):
    print(text if _CHAT.value else p + text)
    if len(prompts) > 1:
      print("---")


def chat_session(sampler, system: list):
  """Read user messages until an empty line or end of input; print each reply."""
  history = list(system)
  print("chat with the model; an empty line or end of input quits", file=sys.stderr)
  while True:
    try:
      line = input("> ")
    except EOFError:
      break
    if not line.strip():
      break
    try:
      text = sample.reply(sampler, history, line)
    except ConfigError as e:  # the template itself (the Jinja sandbox refused it)
      fail(e)
    except DataError as e:  # this message is dropped; the session goes on
      print(f"error: {e}", file=sys.stderr)
      continue
    print(text, flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    lm = runs.load_lm(_MODEL.value, _TEMPLATE.value)
  except (ConfigError, OSError, KeyError, ValueError) as e:  # ValueError: bad JSON, named
    fail(e)
  sampler = sample.TextSampler(lm, chat=_CHAT.value, max_new_tokens=_MAX_NEW.value,
                               temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                               top_p=_TOP_P.value, seed=_SEED.value, dtype=_DTYPE.value or "")
  system = [("system", _SYSTEM.value)] if _SYSTEM.value else []
  if _PROMPT.value:
    complete_prompts(sampler, system, _PROMPT.value)
  elif not _CHAT.value:
    raise app.UsageError("give --prompt, or --chat for an interactive session")
  else:
    chat_session(sampler, system)


if __name__ == "__main__":
  app.run(main)
