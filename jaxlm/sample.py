"""Sample from a model: `python -m jaxlm.sample --model DIR [--prompt TEXT] [--chat]`.

DIR is a jaxlm run (any step folder of it; a LoRA run comes merged) or a Hugging Face
model directory. Without --chat the prompt is continued as plain text; with --chat it is
a user turn rendered with the chat template, and without --prompt the session is
interactive and multi-turn (each reply joins the history). The engine is jaxlm.generate,
the same one RL rollouts use.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from jaxlm.policy import load

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
flags.mark_flag_as_required("model")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxlm import generate  # pylint: disable=import-outside-toplevel
  from jaxlm.config import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxlm.data import sft  # pylint: disable=import-outside-toplevel
  from jaxlm.data.sources import DataError  # pylint: disable=import-outside-toplevel
  try:
    policy = load(_MODEL.value, _TEMPLATE.value)
  except (ConfigError, OSError, KeyError, ValueError) as e:  # ValueError: bad JSON, named
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  tok, template = policy.tokenizer, policy.template
  stop = generate.stop_ids(tok, sft.end_of_turn(template)) if _CHAT.value else ()
  sampling = generate.Sampling(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                               top_k=_TOP_K.value, top_p=_TOP_P.value,
                               stop=(stop,) if stop else ())
  engine = generate.Engine(policy.model_config, eos_id=tok.eos_id, vocab_size=tok.vocab_size)
  rng = jax.random.PRNGKey(_SEED.value)
  system = [("system", _SYSTEM.value)] if _SYSTEM.value else []

  def reply_text(tokens, length):
    return tok.decode(generate.completion_ids(tokens, length, tok.eos_id, stop))

  def run(prompts_ids):
    nonlocal rng
    rng, key = jax.random.split(rng)
    return engine.generate(policy.params, prompts_ids, key, sampling)

  def chat_ids(turns):
    """The conversation as ids (its text encoded as content: a `<|user|>` typed in a
    message is text, not a turn), or None after saying why the template refused it."""
    try:
      return sft.generation_prompt(turns, tok, template)
    except ConfigError as e:  # the template itself (the Jinja sandbox refused it)
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except DataError as e:
      print(f"error: {e}", file=sys.stderr)
      return None

  if _PROMPT.value:
    if _CHAT.value:
      ids = [chat_ids(system + [("user", p)]) for p in _PROMPT.value]
      if any(i is None for i in ids):
        sys.exit(2)
    else:
      ids = [np.asarray([tok.bos_id] + tok.encode(p), np.int32) for p in _PROMPT.value]
    out = run(ids)
    for i, p in enumerate(_PROMPT.value):
      text = reply_text(out.tokens[i], out.lengths[i])
      print(text if _CHAT.value else p + text)
      if len(_PROMPT.value) > 1:
        print("---")
    return
  if not _CHAT.value:
    raise app.UsageError("give --prompt, or --chat for an interactive session")
  history = list(system)
  print("chat with the model; an empty line or end of input quits", file=sys.stderr)
  while True:
    try:
      line = input("> ")
    except EOFError:
      break
    if not line.strip():
      break
    ids = chat_ids(history + [("user", line)])
    if ids is None:  # this message is dropped; the session goes on
      continue
    history.append(("user", line))
    out = run([ids])
    text = reply_text(out.tokens[0], out.lengths[0])
    history.append(("assistant", text))
    print(text, flush=True)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
