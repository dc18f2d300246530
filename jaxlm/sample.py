"""Text from a language model with the engine RL uses (jaxlm.generate).

A `TextSampler` holds a loaded model (runs.LanguageModel), its sampling settings and a
random key: plain prompts are continued as text, conversations [(role, text), ...] are
answered through the chat template (the reply stops at its end-of-turn marker), and
`reply` carries a multi-turn chat. tools/sample.py is the command line over it;
jaxlm.selfdata samples its data through it.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxlm import generate
from jaxlm.config import compute_in
from jaxlm.data import sft



class TextSampler:
  """Prompt ids in, completion texts out, one key split off per call. With `chat`, a
  completion ends at the template's end-of-turn marker (and at EOS, as without).
  `dtype` (one of config.COMPUTE_DTYPES) computes in that dtype instead of the model's own
  (a run's model.dtype, bfloat16 unless it set another; float32 for a Hugging Face
  directory): float32 to compare with another implementation token for token."""

  def __init__(self, lm, *, chat: bool, max_new_tokens: int, temperature: float,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, dtype: str = ""):
    if dtype:
      lm = dataclasses.replace(lm, model_config=compute_in(lm.model_config, dtype, "--dtype"))
    self.lm = lm
    tok = lm.tokenizer
    self.stop = sft.end_of_turn_ids(tok, lm.template) if chat else ()
    self.sampling = generate.Sampling(max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_k=top_k, top_p=top_p,
                                      stop=(self.stop,) if self.stop else ())
    self.engine = generate.Engine(lm.model_config, eos_id=tok.eos_id, vocab_size=tok.vocab_size)
    self.rng = jax.random.PRNGKey(seed)

  def text_ids(self, text: str) -> np.ndarray:
    """A plain-text prompt: BOS, then the text."""
    tok = self.lm.tokenizer
    return np.asarray([tok.bos_id] + tok.encode(text), np.int32)

  def chat_ids(self, turns) -> np.ndarray:
    """A conversation as the prompt of the assistant's next turn, its text encoded as
    content (a `<|user|>` typed in a message is text, not a turn). DataError when the
    template can't render this conversation; ConfigError when it can't render any (the
    Jinja sandbox refused the template itself)."""
    return sft.generation_prompt(turns, self.lm.tokenizer, self.lm.template)

  def complete(self, prompts_ids: list, rows: int = 0) -> list[str]:
    """One completion per prompt, without the EOS or stop sequence that ended it. `rows`:
    rows decoding at once (default: all prompts), a finished row taking the next prompt;
    a fixed count lets calls share one compiled program."""
    tok = self.lm.tokenizer
    self.rng, key = jax.random.split(self.rng)
    out = self.engine.generate(self.lm.params, prompts_ids, key, self.sampling, rows=rows)
    return [tok.decode(generate.completion_ids(tokens, n, tok.eos_id, self.stop))
            for tokens, n in zip(out.tokens, out.lengths)]


def reply(sampler: TextSampler, history: list, message: str) -> str:
  """The model's answer to a user `message` after `history` [(role, text), ...]; the
  message and the answer join the history. A message the template can't render raises
  (DataError, as `TextSampler.chat_ids`) and leaves the history as it was."""
  ids = sampler.chat_ids(history + [("user", message)])
  history.append(("user", message))
  text = sampler.complete([ids])[0]
  history.append(("assistant", text))
  return text
