"""jaxlm models in EleutherAI's lm-evaluation-harness (lm_eval >= 0.4.13): the `jaxlm`
model, scoring with jaxlm's forward pass and generating with its sampling engine.

    python -m jaxlm.harness --model jaxlm --model_args pretrained=runs/sft,dtype=float32 \
        --tasks hellaswag --batch_size 16 --output_path runs/lm_eval/sft

`python -m jaxlm.harness` takes lm_eval's own command line: lm_eval 0.4.13 finds models
only in its own table or among modules already imported (no entry points), so a plain
`lm_eval --model jaxlm` can't see this one; this module registers it and then runs
lm_eval's CLI. In Python, `import jaxlm.harness` and then `lm_eval.simple_evaluate(
model="jaxlm", ...)`, or pass a `JaxLM` instance. Nothing else in jaxlm imports this module
at its top (lm_eval is a heavy, optional dependency: the `eval` extra).

model_args:
    pretrained       a jaxlm run (workdir, checkpoints folder or step folder) or a Hugging
                     Face model directory (runs.load_lm)
    batch_size       rows per compiled batch (default 8; lm_eval's --batch_size sets it)
    dtype            compute dtype: float32, bfloat16 or float16; default the model's own
                     (a run's model.dtype, float32 for a HF directory)
    max_length       longest scored or prompted sequence in tokens (default the model's
                     max_seq_len); longer contexts lose their left end, as in lm_eval's hf
    max_gen_toks     generate_until's default token budget (256), unless the task sets one
    add_bos_token    whether contexts start with BOS (default true: jaxlm trains on BOS
                     text EOS; a tokenizer with no BOS uses its EOS, as jaxlm does)
    data_parallel    devices the rows are spread over (default 1: the default device;
                     -1: all of this process's devices); weights are replicated on each
    seed             sampling seed for requests with do_sample
    chat_template    jaxlm | chatml | llama3 | hf, for lm_eval's --apply_chat_template;
                     default the run's (hf for a HF directory with one)

Requests are sorted by length and padded to `generate.bucket` lengths (and to
`batch_size` rows), so each length bucket compiles once. `generate_until` cuts each
completion at the first stop string (`until`, and the EOS text) and also stops a row
early when its tokens spell one.
"""

from __future__ import annotations

import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import lm_eval
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval import utils as lm_utils
from tqdm import tqdm

from jaxlm import cli, console, generate, losses, model, runs, sharding
from jaxlm.config import base_config, check_compute_dtype, compute_in
from jaxlm.data import sft
from jaxlm.errors import ConfigError


def _scores(params, tokens_BT, targets_BT, mask_BT, *, cfg, sharder):
  """Per row: the sum of log p(target) over masked positions, and whether every masked
  target is the argmax (greedy)."""
  h = model.hidden_states(params, tokens_BT, cfg, sharder=sharder)
  log_z, target_logit, correct = model.token_stats(params, h, targets_BT, cfg, sharder)
  mask = mask_BT.astype(jnp.float32)
  logp_B = losses.sequence_logps_from_stats(log_z, target_logit, mask)
  greedy_B = jnp.all((correct > 0) | (mask == 0), axis=-1)
  return logp_B, greedy_B


@register_model("jaxlm")
class JaxLM(TemplateLM):
  """A jaxlm run or a HF directory as an lm_eval model (see the module docstring for
  its model_args)."""

  def __init__(self, pretrained: str = "", batch_size=8, dtype: str = "", max_length=0,
               max_gen_toks=256, add_bos_token=True, data_parallel=1, seed=0,
               chat_template="", max_batch_size=None, device=None):
    super().__init__()
    if not pretrained:
      raise ConfigError("model_args pretrained: empty; name a jaxlm run or a HF directory")
    if str(batch_size).startswith("auto"):
      console.warning("jaxlm: batch_size=auto is not supported; using 8 rows")
      batch_size = 8
    del max_batch_size  # lm_eval's --batch_size auto only
    if device not in (None, "", "cpu", "cuda", "tpu"):
      console.warning(f"jaxlm: device={device!r} ignored; rows go to JAX's devices "
                      f"(data_parallel)")
    check_compute_dtype(dtype, "model_args dtype")  # before the (long) load
    lm = runs.load_lm(pretrained, chat_template)
    cfg = compute_in(lm.model_config, dtype, "model_args dtype")
    self.cfg, self.tok, self.pretrained = cfg, lm.tokenizer, pretrained
    self.template = lm.template
    self.batch_size = int(batch_size)
    self._max_length = int(max_length) or cfg.max_seq_len
    self.max_gen_toks = int(max_gen_toks)
    self.add_bos_token = (add_bos_token if isinstance(add_bos_token, bool)
                          else cli.parse_bool(str(add_bos_token), "model_args add_bos_token"))
    self.sharder = self._sharder(int(data_parallel))
    if self.sharder is not None:
      params = jax.device_put(lm.params, self.sharder.sharding(()))  # whole on every device
      dp = self.sharder.data_parallel_size
      self.batch_size = -(-self.batch_size // dp) * dp
    else:
      params = lm.params
    self.params = params
    self.engine = generate.Engine(cfg, eos_id=self.tok.eos_id, vocab_size=self.tok.vocab_size,
                                  sharder=self.sharder)
    self._score_fn = jax.jit(functools.partial(_scores, cfg=cfg, sharder=self.sharder))
    self._rng = jax.random.PRNGKey(int(seed))

  @staticmethod
  def _sharder(data_parallel: int) -> sharding.Sharder | None:
    """Rows over `data_parallel` local devices (None: the default device alone)."""
    devices = jax.local_devices()
    n = len(devices) if data_parallel == -1 else data_parallel
    if n < 1 or n > len(devices):
      raise ConfigError(f"model_args data_parallel={data_parallel}: between 1 and "
                        f"{len(devices)} (this process's devices), or -1 for all")
    if n == 1:
      return None
    c = base_config()
    mesh = sharding.make_mesh({"data": n, "fsdp": 1, "tensor": 1}, devices[:n])
    return sharding.Sharder(mesh, c.sharding.rules)

  # -- what lm_eval asks of a model -----------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    """What an empty context and a rolling window are conditioned on: BOS."""
    return self.tok.bos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def tokenizer_name(self) -> str:
    return self.tok.path

  def chat_template(self, chat_template=False) -> str | None:
    """What identifies the chat template (lm_eval hashes it into its cache keys)."""
    if chat_template is False or chat_template is None:
      return None
    t = self.template
    return t.jinja or json.dumps([t.name, t.begin, t.header, t.end])

  def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
    """The conversation as the model's chat template writes it (without BOS, which
    tok_encode adds); with add_generation_prompt, up to the assistant's next turn."""
    turns = [(m["role"], m["content"], False) for m in chat_history]
    # the renderer sft.prompt_ids uses (a public name for it is sft.py's to give)
    parts = sft._chat_parts(  # pylint: disable=protected-access
        turns, self.tok, self.template, add_generation_prompt)
    if isinstance(parts, str):
      raise sft.DataError(f"chat template {self.template.name!r}: can't render this "
                          f"conversation ({parts})")
    return "".join(text for text, _, _ in parts)

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list:
    """The text's ids, BOS first unless add_special_tokens=False (or add_bos_token off)."""
    bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
    return ([self.tok.bos_id] if bos else []) + list(self.tok.encode(string))

  def tok_decode(self, ids) -> str:
    return self.tok.decode(ids)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """(log p(continuation | context), greedy) per (request, context ids, continuation
    ids), the row cut on its left to max_length + 1 tokens."""
    rows = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
    results = self._score_rows(rows, [len(cont) for _, _, cont in requests], disable_tqdm)
    for (args, _, _), answer in zip(requests, results):
      if args is not None:
        self.cache_hook.add_partial("loglikelihood", args, answer)
    return results

  def _score_rows(self, rows: list, scored: list, disable_tqdm: bool = True) -> list:
    """(sum of log p, greedy) of the last `scored[i]` tokens of each id row, longest rows
    first, `batch_size` rows at a time."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = [None] * len(rows)
    B = self.batch_size
    for lo in tqdm(range(0, len(order), B), disable=disable_tqdm, desc="jaxlm loglikelihood"):
      chunk = order[lo:lo + B]
      longest = max(len(rows[i]) - 1 for i in chunk)
      T = max(longest, min(generate.bucket(longest), self.max_length))
      tokens = np.zeros((B, T), np.int32)
      targets = np.zeros((B, T), np.int32)
      mask = np.zeros((B, T), np.int32)
      for j, i in enumerate(chunk):
        r, n = rows[i], len(rows[i]) - 1
        tokens[j, :n], targets[j, :n] = r[:-1], r[1:]
        mask[j, n - scored[i]:n] = 1
      batch = {"t": tokens, "y": targets, "m": mask}
      if self.sharder is not None:
        batch = sharding.global_batch(batch, self.sharder)
      logp, greedy = self._score_fn(self.params, batch["t"], batch["y"], batch["m"])
      logp, greedy = np.asarray(logp), np.asarray(greedy)
      for j, i in enumerate(chunk):
        out[i] = (float(logp[j]), bool(greedy[j]))
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
    """log p(text | BOS) of each whole text, in disjoint windows of max_length tokens."""
    rows, scored, owner = [], [], []
    for k, (string,) in enumerate(r.args for r in requests):
      windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string, add_special_tokens=False),
          prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1))
      for ctx, cont in windows:
        rows.append((ctx + cont)[-(self.max_length + 1):])
        scored.append(len(cont))
        owner.append(k)
    totals = [0.0] * len(requests)
    for k, (logp, _) in zip(owner, self._score_rows(rows, scored, disable_tqdm)):
      totals[k] += logp
    for r, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list:
    """Completions of each context, greedy unless its gen_kwargs ask to sample, cut at
    the first stop string."""
    eos = self.tok.decode([self.tok.eos_id])
    groups = {}
    for i, r in enumerate(requests):
      context, gen_kwargs = r.args
      kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
      until = tuple(handle_stop_sequences(kwargs.pop("until", None), eos=eos))
      n = int(kwargs.pop("max_gen_toks"))
      temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample") else 0.0
      key = (until, n, temperature, int(kwargs.pop("top_k", 0) or 0),
             float(kwargs.pop("top_p", 1.0) or 1.0))
      groups.setdefault(key, []).append((i, context))
    out = [None] * len(requests)
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="jaxlm generate_until")
    for (until, n, temperature, top_k, top_p), items in groups.items():
      stop = tuple(s for s in (_stop_ids(self.tok, u) for u in until) if s)
      sampling = generate.Sampling(n, temperature, top_k, top_p, stop=stop)
      budget = self.max_length - n
      if budget < 1:
        raise ConfigError(f"generate_until: max_gen_toks={n} leaves no room for a context "
                          f"within max_length={self.max_length}")
      prompts = [np.asarray(self.tok_encode(c)[-budget:], np.int32) for _, c in items]
      order = sorted(range(len(items)), key=lambda j: -len(prompts[j]))
      for lo in range(0, len(order), self.batch_size):
        chunk = order[lo:lo + self.batch_size]
        longest = max(len(prompts[j]) for j in chunk)
        P = max(longest, min(generate.bucket(longest), budget))
        self._rng, key = jax.random.split(self._rng)
        gen = self.engine.generate(self.params, [prompts[j] for j in chunk], key, sampling,
                                   rows=self.batch_size, prompt_len=P)
        for k, j in enumerate(chunk):
          ids = [int(t) for t in gen.tokens[k, :gen.lengths[k]]]
          text = _cut(self.tok.decode(ids), until)
          i = items[j][0]
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.update(len(chunk))
    bar.close()
    return out


def _stop_ids(tok, stop: str) -> tuple[int, ...]:
  """Ids that end a row early: the stop string's own, when they decode to it exactly and
  it starts with no space (so wherever they occur, the text holds the string, and the cut
  there equals the cut of a longer completion); else () and the text cut alone."""
  if not stop or stop[0].isspace():
    return ()
  ids = tuple(int(i) for i in tok.encode(stop))
  return ids if ids and tok.decode(list(ids)) == stop else ()


def _cut(text: str, until) -> str:
  """`text` up to the first of the stop strings in it."""
  for s in until:
    if s and s in text:
      text = text[:text.index(s)]
  return text


@functools.lru_cache(maxsize=4)
def _task_manager(include: str):
  """lm_eval's task index (with the YAMLs of `include`): built once per process, since
  building it reads every task file lm_eval ships (seconds)."""
  from lm_eval.tasks import TaskManager  # lazy: that index
  return TaskManager(include_path=include or None)


def task_names(e) -> tuple[list[str], object]:
  """The names in `e.lm_eval_tasks` and lm_eval's TaskManager that knows them;
  ConfigError naming the key for a name it does not know."""
  names = [t.strip() for t in e.lm_eval_tasks.split(",") if t.strip()]
  try:
    manager = _task_manager(e.lm_eval_include)
  except (KeyError, ValueError, OSError) as err:  # a task YAML lm_eval cannot read
    raise ConfigError(f"eval.lm_eval_include={e.lm_eval_include!r}: lm_eval: {err}") from None
  unknown = [n for n in names if n not in manager.all_tasks]
  if unknown:
    raise ConfigError(f"eval.lm_eval_tasks: no lm_eval task {unknown[0]!r}"
                      + (f" (nor in {e.lm_eval_include})" if e.lm_eval_include else ""))
  return names, manager


def evaluate_tasks(e, path: str, batch_size: int) -> dict:
  """lm_eval's output (made JSON-able) for the tasks of an eval section `e`
  (`e.lm_eval_tasks`, `_include`, `_limit`, `_num_fewshot`, `_dtype`, `chat_template`) on
  the model at `path`. Every process runs them (lm_eval sees each as rank 0) and gets
  the same output."""
  names, manager = task_names(e)
  lm = JaxLM(pretrained=path, batch_size=batch_size, dtype=e.lm_eval_dtype,
             chat_template=e.chat_template)
  try:
    output = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=e.lm_eval_limit or None,
        num_fewshot=None if e.lm_eval_num_fewshot < 0 else e.lm_eval_num_fewshot)
  except (KeyError, ValueError) as err:  # a task lm_eval cannot build (its YAML, its data)
    raise ConfigError(f"eval.lm_eval_tasks={e.lm_eval_tasks!r}: lm_eval: {err}") from None
  return json.loads(json.dumps(output, default=lm_utils.handle_non_serializable))


def main(argv=None) -> None:
  """lm_eval's command line with the `jaxlm` model registered."""
  sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
  cli_evaluate()


if __name__ == "__main__":
  main()
