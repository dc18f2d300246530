"""Supervised fine-tuning data: records -> conversation -> chat template -> tokens and a
loss mask -> packed batches.

Formats follow TRL's dataset conventions and are detected by their fields:

    alpaca              {"instruction", "input" (optional), "output"}
    messages            {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}
    prompt_completion   {"prompt", "completion"}: strings, or lists of messages
    text                {"text"}: plain language modeling, every token supervised

in JSON (a list of records) or JSONL files, gzip accepted. Every record that can't be
used is reported with its file and line; `on_error="raise"` stops at the first, "skip"
counts them. Examples longer than `seq_len + 1` tokens are truncated (or dropped), and an
example whose supervised tokens would all be cut away is dropped and counted: nothing is
trained on as empty.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gzip
import importlib
import inspect
import json
import os
import random
import re
import textwrap
import warnings
import zlib

import grain
import numpy as np

from jaxlm import fileio
from jaxlm.data import world
from jaxlm.data.lm import READ_OPTIONS
from jaxlm.data.sources import (MAX_RECORD_BYTES, READ_ERRORS, DataError, Examples, bounded_lines,
                                error_detail, is_text, json_list, parse_json)
from jaxlm.errors import ConfigError, MarkerError


FORMATS = ("auto", "alpaca", "messages", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How a conversation becomes text. Each turn is header(role) + content + end; the
  strings in `specials` must each be one token of the tokenizer. With `jinja` (a Hugging
  Face chat template) that template renders the turns instead."""
  name: str
  header: str = ""       # with {role}
  end: str = ""
  begin: str = ""        # once, before the first turn (after BOS)
  specials: tuple[str, ...] = ()
  jinja: str = ""
  eos_token: str = ""    # what a jinja template calls eos_token
  source: str = ""       # the tokenizer_config.json a jinja template came from


TEMPLATES = {
    # jaxlm's own: the role tokens every tokenizer jaxlm trains reserves.
    "jaxlm": ChatTemplate("jaxlm", "<|{role}|>\n", "<|end|>\n",
                          specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "chatml": ChatTemplate("chatml", "<|im_start|>{role}\n", "<|im_end|>\n",
                           specials=("<|im_start|>", "<|im_end|>")),
    "llama3": ChatTemplate("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n",
                           "<|eot_id|>", specials=("<|start_header_id|>", "<|end_header_id|>",
                                                   "<|eot_id|>")),
}


def hf_template(tokenizer_path: str) -> ChatTemplate:
  """The chat template in the tokenizer_config.json beside a tokenizer file."""
  path = os.path.join(os.path.dirname(os.path.abspath(tokenizer_path)), "tokenizer_config.json")
  config = {}
  if os.path.isfile(path):
    try:
      config = fileio.read_json(path)
    except (ValueError, OSError) as e:
      raise ConfigError(f"data.chat_template='hf': {e}") from None
  template = config.get("chat_template") if isinstance(config, dict) else None
  if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
    template = {t.get("name"): t.get("template") for t in template
                if isinstance(t, dict)}.get("default")
  if not isinstance(template, str) or not template:
    raise ConfigError(f"data.chat_template='hf': no chat_template in {path}")
  try:
    _compiled(template)
  except Exception as e:  # pylint: disable=broad-except  # TemplateSyntaxError, or deeper trouble
    line = f", line {e.lineno}" if getattr(e, "lineno", None) else ""
    raise ConfigError(f"data.chat_template='hf': the chat_template in {path} does not "
                      f"parse ({error_detail(e)}{line})") from None
  eos = config.get("eos_token") or ""
  eos = eos.get("content", "") if isinstance(eos, dict) else eos
  return ChatTemplate("hf", jinja=template, eos_token=eos if isinstance(eos, str) else "",
                      source=path)


def chat_template(name: str, tok, check: bool = True) -> ChatTemplate:
  """`name` (data.chat_template) for `tok`: the model's own Jinja template for "hf",
  else a built-in one whose role markers must (with `check`) be single tokens of `tok`.
  (A sampler that may never render a chat leaves the check to its use.)"""
  if name == "hf":
    return hf_template(tok.path)
  template = TEMPLATES[name]
  if check:
    check_template(template, tok)
  return template


@functools.lru_cache(maxsize=8)
def _compiled(jinja: str):
  """A Hugging Face chat template compiled the way transformers does (sandboxed,
  trim_blocks, lstrip_blocks, raise_exception)."""
  import jinja2  # lazy: only for HF chat templates
  from jinja2 import sandbox  # lazy: only for HF chat templates

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(jinja)


def _render(template: ChatTemplate, messages, add_generation_prompt: bool) -> str | None:
  """The template's text for `messages`, or None when it refuses them (its
  raise_exception, or an error in it). A template the sandbox stops (it reached for
  `__class__` or the like) is a ConfigError: that is the template's fault, not a record's."""
  from jinja2 import sandbox  # lazy: only for HF chat templates
  try:  # BOS is added as an id, never as text
    return _compiled(template.jinja).render(messages=messages, bos_token="",
                                            eos_token=template.eos_token,
                                            add_generation_prompt=add_generation_prompt)
  except sandbox.SecurityError as e:
    source = template.source or "tokenizer_config.json"
    raise ConfigError(f"data.chat_template='hf': the Jinja sandbox refused the chat_template "
                      f"in {source} ({error_detail(e)})") from None
  except Exception:  # pylint: disable=broad-except  # TemplateError, TypeError, ...: this record
    return None


_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use characters: a stand-in for content i


def _content_spans(template: ChatTemplate, messages, add_generation_prompt: bool, text: str,
                   tok) -> list[tuple[int, int] | None] | str:
  """Where each message's content lies in `text` (the template's rendering of
  `messages`): found by rendering stand-ins for the contents, so that a content is never
  mistaken for the template's own text; for a template that changes or drops content,
  each is looked for after the one before. None for one not found; a reason when one
  that holds special-token text is not found (it could not be encoded as content)."""
  stand_ins = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
  skeleton = _render(template, stand_ins, add_generation_prompt)
  if skeleton is not None:
    pieces = _MARK.split(skeleton)
    order = [int(k) for k in pieces[1::2]]
    if order == sorted(set(order)) and all(k < len(messages) for k in order):
      spans, rebuilt = [None] * len(messages), pieces[0]
      for k, after in zip(order, pieces[2::2]):
        content = messages[k]["content"]
        spans[k] = (len(rebuilt), len(rebuilt) + len(content))
        rebuilt += content + after
      if rebuilt == text:
        return spans
  pattern = tok.special_pattern()
  spans, cursor = [], 0
  for m in messages:
    content = m["content"]
    at = text.find(content, cursor)
    if at < 0 and content.strip():
      content = content.strip()
      at = text.find(content, cursor)
    if at < 0:
      if pattern is not None and pattern.search(m["content"]):
        return "template_error"
      spans.append(None)
      continue
    spans.append((at, at + len(content)))
    cursor = at + len(content)
  return spans


def _cut(text: str, supervised: list, content: list) -> list[tuple[str, bool, bool]]:
  """`text` as (text, supervised, is_content) parts, given the ranges of each."""
  points = sorted({0, len(text), *(p for r in supervised + content for p in r)})
  inside = lambda a, b, ranges: any(s <= a and b <= e for s, e in ranges)  # noqa: E731
  return [(text[a:b], inside(a, b, supervised), inside(a, b, content))
          for a, b in zip(points, points[1:])]


def _render_jinja(template: ChatTemplate, turns, tok) -> list[tuple[str, bool, bool]] | str:
  """The conversation as (text, supervised, is_content) parts, rendered by a Hugging
  Face template. Turn i's text is what rendering turns[:i+1] adds to rendering
  turns[:i]; in a supervised turn, that text from its content on (content, end marker)
  is supervised. Each message's content is encoded as content (`_content_spans`)."""
  messages = [{"role": role, "content": text} for role, text, _ in turns]
  ends, text = [], ""
  for i in range(len(turns)):
    longer = _render(template, messages[:i + 1], False)
    if longer is None:
      return "template_error"
    if not longer.startswith(text):
      return "template_not_incremental"
    text = longer
    ends.append(len(text))
  spans = _content_spans(template, messages, False, text, tok)
  if isinstance(spans, str):
    return spans
  supervised = []
  for i, (_, _, sup) in enumerate(turns):
    if sup:
      if spans[i] is None or not (ends[i - 1] if i else 0) <= spans[i][0] <= ends[i]:
        return "template_error"
      supervised.append((spans[i][0], ends[i]))
  return _cut(text, supervised, [s for s in spans if s is not None])


def check_template(template: ChatTemplate, tok) -> None:
  for special in template.specials:
    ids = tok.encode(special)
    pieces = [i for i in ids if tok.decode([i]).strip()]  # a leading space piece may come first
    if len(pieces) != 1:
      raise ConfigError(f"data.chat_template={template.name!r}: {special!r} is not one token of "
                        f"{tok.path} (it encodes to {len(ids)}); use a template whose role "
                        f"markers the tokenizer has")


# ---------------------------------------------------------------------------------------
# Reading records with their file and line


def read_records(path: str, max_bytes: int = MAX_RECORD_BYTES):
  """(where, record or a reason string) for every record of a JSON or JSONL file.

  A record is a JSON object of text (`is_text`); one over `max_bytes`
  (data.max_record_bytes) is `too_long`, read past in bounded pieces, never held whole.
  A JSONL file that breaks off (a truncated gzip) gives a `read_error` where it broke,
  after the records before it."""
  opener = gzip.open if path.endswith(".gz") else open
  if path.endswith((".json", ".json.gz")) and not path.endswith((".jsonl", ".jsonl.gz")):
    yield from _json_records(path, opener, max_bytes)
    return
  lineno = 0
  try:
    with opener(path, "rb") as f:
      for lineno, (_, _, line) in enumerate(bounded_lines(f, max_bytes), 1):
        if line is None:
          yield f"{path}:{lineno}", "too_long"
        elif line.strip():
          record, reason = parse_json(line)
          yield f"{path}:{lineno}", reason or _object(record)
  except READ_ERRORS:  # the rest of the file is lost: one record's worth is counted
    yield f"{path}:{lineno + 1}", "read_error"


def _object(record):
  """A record must be a JSON object: anything else (a string too) is `wrong_type`."""
  return record if isinstance(record, dict) else "wrong_type"


def _json_records(path: str, opener, max_bytes: int = MAX_RECORD_BYTES):
  """The records of a .json list, found one at a time in bounded pieces
  (`sources.json_list`): one over `max_bytes` is `too_long`, one not UTF-8 a
  `decode_error`; JSON that can't be parsed stops the file (where the next record starts
  is lost with it)."""
  try:
    f = opener(path, "rb")
  except READ_ERRORS as e:
    raise DataError(f"{path}:1: read_error ({error_detail(e)})") from None
  with f:
    for line, raw in json_list(f, path, max_bytes):
      where = f"{path}:{line}"
      try:
        text = None if raw is None else raw.decode("utf-8")
      except UnicodeDecodeError:
        yield where, "decode_error"
        continue
      if text is None:
        yield where, "too_long"
        continue
      try:
        record = json.loads(text)
      except (ValueError, RecursionError) as e:
        at = line + text.count("\n", 0, e.pos) if isinstance(e, json.JSONDecodeError) else line
        raise DataError(f"{path}:{at}: invalid JSON ({getattr(e, 'msg', error_detail(e))}); a "
                        f"broken .json list stops here whatever data.on_error says, since the "
                        f"records after it can't be found") from None
      yield where, _object(record) if is_text(record) else "decode_error"


def detect_format(record: dict) -> str | None:
  if "messages" in record:
    return "messages"
  if "prompt" in record and "completion" in record:
    return "prompt_completion"
  if "instruction" in record and "output" in record:
    return "alpaca"
  if "text" in record:
    return "text"
  return None


def _messages(value) -> list[dict] | str:
  """A list of {role, content} dicts, or the reason it isn't one."""
  if not isinstance(value, list) or not value:
    return "wrong_type"
  for m in value:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      return "wrong_type"
    if m["role"] not in ROLES or not isinstance(m["content"], str):
      return "wrong_type"
  return value


def to_turns(record, fmt: str):
  """A record -> ([(role, text, supervised)], is_chat) or a reason string.

  Alpaca becomes a user turn (instruction, a blank line, input) and an assistant turn.
  A plain-text prompt/completion is not a chat: BOS prompt completion EOS, with the
  completion (and EOS) supervised, joined as written, as TRL does. Conversations supervise their assistant turns (for a
  conversational prompt/completion, the completion's)."""
  if not isinstance(record, dict):
    return "wrong_type"
  kind = detect_format(record) if fmt == "auto" else fmt
  if kind is None:
    return "missing_field"
  if kind == "text":
    if not isinstance(record.get("text"), str):
      return "wrong_type" if "text" in record else "missing_field"
    if not record["text"].strip():
      return "empty_response"
    return [("user", "", False), ("assistant", record["text"], True)], False
  if kind == "alpaca":
    if "instruction" not in record or "output" not in record:
      return "missing_field"
    instruction, extra, output = record["instruction"], record.get("input", ""), record["output"]
    if not all(isinstance(x, str) for x in (instruction, extra or "", output)):
      return "wrong_type"
    if not output.strip():
      return "empty_response"
    prompt = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
    return [("user", prompt, False), ("assistant", output, True)], True
  if kind == "prompt_completion":
    if "prompt" not in record or "completion" not in record:
      return "missing_field"
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
      if not completion.strip():
        return "empty_response"
      return [("user", prompt, False), ("assistant", completion, True)], False
    prompt, completion = _messages(prompt), _messages(completion)
    if isinstance(prompt, str) or isinstance(completion, str):
      return "wrong_type"
    turns = [(m["role"], m["content"], False) for m in prompt]
    turns += [(m["role"], m["content"], m["role"] == "assistant") for m in completion]
  else:
    if "messages" not in record:
      return "missing_field"
    messages = _messages(record["messages"])
    if isinstance(messages, str):
      return messages
    turns = [(m["role"], m["content"], m["role"] == "assistant") for m in messages]
  supervised = [t for t in turns if t[2]]
  if not supervised:
    return "no_assistant_turn"
  if any(not t[1].strip() for t in supervised):
    return "empty_response"
  return turns, True


def tokenize(turns, is_chat: bool, tok, template: ChatTemplate, loss_on: str):
  """-> (ids, supervised) int32/bool arrays of equal length, BOS first (or a reason
  string when a Hugging Face template can't render the conversation).

  The whole text is encoded at once, as it will be at inference, and a token is
  supervised when it starts inside a supervised part (a response, or its end marker).
  Only the template inserts special tokens: the records' text is encoded as content
  (`tok.encode_parts`), so a literal `<|user|>` in a message is text, not a turn."""
  parts = _chat_parts(turns, tok, template, False) if is_chat else None
  if isinstance(parts, str):
    return parts
  if not is_chat:
    (_, prompt, _), (_, completion, _) = turns
    parts = [(prompt, False, True), (completion, True, True)]
  parts = [part for part in parts if part[0]]
  starts = np.cumsum([0] + [len(t.encode("utf-8")) for t, _, _ in parts[:-1]])
  try:
    ids, offsets = tok.encode_parts([(t, content) for t, _, content in parts])
  except MarkerError:
    return "split_marker"
  part_of_token = np.searchsorted(starts, np.asarray(offsets, np.int64), side="right") - 1
  sup = np.asarray([sup for _, sup, _ in parts], bool)[np.maximum(part_of_token, 0)]
  ids = np.concatenate([[tok.bos_id], ids]).astype(np.int32)
  sup = np.concatenate([[False], sup])
  if not is_chat:
    ids, sup = np.append(ids, np.int32(tok.eos_id)), np.append(sup, True)
  if loss_on == "all":
    sup = np.ones_like(sup)
  return ids, sup


def _chat_parts(turns, tok, template: ChatTemplate, add_generation_prompt: bool):
  """A conversation [(role, text, supervised)] as (text, supervised, is_content) parts,
  or the reason the template can't render it; with `add_generation_prompt`, up to the
  assistant's next turn (its header; a Jinja template's add_generation_prompt)."""
  if template.jinja and not add_generation_prompt:
    return _render_jinja(template, turns, tok)
  if template.jinja:
    messages = [{"role": role, "content": text} for role, text, _ in turns]
    text = _render(template, messages, True)
    if text is None:
      return "template_error"
    spans = _content_spans(template, messages, True, text, tok)
    return spans if isinstance(spans, str) else _cut(text, [], [s for s in spans if s])
  parts = [(template.begin, False, False)]
  for role, text, supervised in turns:
    # the end-of-turn marker is supervised with its turn: how the model learns to stop
    parts += [(template.header.format(role=role), False, False), (text, supervised, True),
              (template.end, supervised, False)]
  if add_generation_prompt:
    parts.append((template.header.format(role="assistant"), False, False))
  return parts


def prompt_ids(turns, tok, template: ChatTemplate) -> np.ndarray | str:
  """BOS and a conversation [(role, text)] rendered up to the assistant's next turn, as
  ids to generate from (its text encoded as content, as `tokenize` does), or the reason
  the template can't render it."""
  parts = _chat_parts([(r, t, False) for r, t in turns], tok, template, True)
  if isinstance(parts, str):
    return parts
  try:
    ids, _ = tok.encode_parts([(t, content) for t, _, content in parts if t])
  except MarkerError:
    return "split_marker"
  return np.asarray([tok.bos_id] + ids, np.int32)


def generation_prompt(turns, tok, template: ChatTemplate) -> np.ndarray:
  """`prompt_ids`, raising DataError when the template can't render the conversation."""
  ids = prompt_ids(turns, tok, template)
  if isinstance(ids, str):
    raise DataError(f"data.chat_template={template.name!r}: can't render this conversation "
                    f"({ids})")
  return ids


def end_of_turn(template: ChatTemplate) -> str:
  """The marker that closes an assistant turn: generation stops at it."""
  return template.end.strip() or template.eos_token


def end_of_turn_ids(tok, template: ChatTemplate) -> tuple[int, ...]:
  """The ids `end_of_turn(template)` encodes to, leading space pieces dropped: the stop
  sequence that ends a chat reply."""
  marker = end_of_turn(template)
  return tuple(i for i in tok.encode(marker) if tok.decode([i]).strip()) if marker else ()


def load_examples(files: list[str], tok, template: ChatTemplate, *, fmt: str, seq_len: int,
                  loss_on: str, truncation: str, on_error: str,
                  max_bytes: int = MAX_RECORD_BYTES) -> Examples:
  """Every record of `files` -> training examples of at most seq_len tokens, counted."""
  out = Examples()
  for path in files:
    for where, record in read_records(path, max_bytes):
      out.counts["records"] += 1
      turns = record if isinstance(record, str) else to_turns(record, fmt)
      # a reason string; or the model's own template may refuse the conversation
      tokenized = turns if isinstance(turns, str) else tokenize(*turns, tok, template, loss_on)
      if isinstance(tokenized, str):
        out.skip(where, tokenized, on_error)
        continue
      ids, sup = tokenized
      inputs, targets, mask = ids[:-1], ids[1:], sup[1:]
      if len(inputs) > seq_len:
        if truncation == "drop" or not mask[:seq_len].any():
          out.skip(where, "dropped_too_long" if truncation == "drop" else "dropped_truncated_away",
                   on_error)
          continue
        inputs, targets, mask = inputs[:seq_len], targets[:seq_len], mask[:seq_len]
        out.counts["truncated"] += 1
      out.counts["used"] += 1
      out.examples.append({"inputs": inputs, "targets": targets,
                           "loss_mask": mask.astype(np.int32)})
  return out


def _to_row(packed: dict) -> dict:
  return {"tokens": packed["inputs"], "targets": packed["targets"],
          "loss_mask": packed["loss_mask"], "segment_ids": packed["inputs_segment_ids"],
          "positions": packed["inputs_positions"]}


def _pad_row(ex: dict, seq_len: int) -> dict:
  n = len(ex["inputs"])
  pad = lambda x: np.pad(x, (0, seq_len - n))  # noqa: E731
  return {"tokens": pad(ex["inputs"]), "targets": pad(ex["targets"]),
          "loss_mask": pad(ex["loss_mask"]),
          "segment_ids": pad(np.ones(n, np.int32)), "positions": pad(np.arange(n, dtype=np.int32))}


def record_stream(ds, *, seed: int, shuffle: bool, repeat: bool, process_index: int,
                  process_count: int):
  """Whole records (a grain MapDataset) -> this process's share as an IterDataset,
  shuffled (again every epoch) and repeated as asked: how SFT, preference and RL data
  are read."""
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  return ds[process_index::process_count].to_iter_dataset(READ_OPTIONS)


def sft_dataset(examples: list, *, seq_len: int, batch_size: int, seed: int, shuffle: bool,
                packing: bool, repeat: bool = True, process_index: int = 0,
                process_count: int = 1, prefetch: int = 0) -> grain.IterDataset:
  """Batches of rows [tokens, targets, loss_mask, segment_ids, positions].

  With `packing`, examples are packed whole (first fit, never split) into rows, each its
  own segment with positions from 0; without, one example per row, padded."""
  ds = record_stream(grain.MapDataset.source(examples), seed=seed, shuffle=shuffle,
                     repeat=repeat, process_index=process_index, process_count=process_count)
  if packing:
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=dict.fromkeys(("inputs", "targets", "loss_mask"), seq_len),
        num_packing_bins=max(batch_size, 8), seed=seed, shuffle_bins=shuffle)
    ds = ds.map(_to_row)
  else:
    ds = ds.map(lambda ex: _pad_row(ex, seq_len))
  ds = ds.batch(batch_size, drop_remainder=True)
  if prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds


# ---------------------------------------------------------------------------------------
# Built-in data: an instruction set from the Python standard library, no download.

BUILTIN_PREFIX = "builtin:"


def _source_signature(fn) -> str | None:
  """`fn`'s parameters as its source writes them (`copy_function=copy2`, never the
  default's repr, which may hold a memory address or this machine's paths), or None."""
  try:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
  except (OSError, TypeError, SyntaxError):  # no source (made by exec), or not a def
    return None
  node = tree.body[0] if tree.body else None
  if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
    return None
  returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
  return f"({ast.unparse(node.args)}){returns}"


def stdlib_docstrings(path: str, modules: tuple[str, ...] | None = None) -> str:
  """Write an Alpaca-format JSONL of "what does this function do?" pairs, drawn from the
  public functions and methods of standard-library modules (`modules`, else the list in
  `_stdlib_docstring_records`) and their docstrings. The text is the standard library's
  own (signatures as its source writes them), so it is the same in every process on the
  same Python."""
  return fileio.write_jsonl(path, _stdlib_docstring_records(modules))


def _stdlib_docstring_records(modules: tuple[str, ...] | None = None) -> list[dict]:
  defaults = ("json", "textwrap", "string", "shutil", "os.path", "fnmatch", "glob", "base64",
              "bisect", "heapq", "statistics", "random", "calendar", "difflib", "csv", "gzip",
              "copy", "functools", "itertools", "operator", "html", "urllib.parse", "ipaddress",
              "tempfile", "shlex", "colorsys", "fractions", "decimal", "datetime", "zipfile",
              "email.utils", "http.cookies", "pprint", "keyword", "linecache", "tokenize",
              "secrets", "uuid", "hashlib", "hmac", "quopri", "wave", "plistlib", "netrc",
              "os", "collections", "pathlib", "argparse", "logging", "unittest", "configparser",
              "inspect", "ast", "dis", "pydoc", "typing", "enum", "dataclasses", "contextlib",
              "threading", "subprocess", "socket", "smtplib", "ftplib", "imaplib", "mailbox",
              "tarfile", "codecs", "locale", "gettext", "traceback", "warnings", "weakref",
              "shelve", "selectors", "sched", "queue", "concurrent.futures", "optparse",
              "getopt", "cmd", "code", "doctest", "pdb", "profile", "pstats", "timeit", "trace",
              "http.client", "http.server", "urllib.request", "xml.dom.minidom",
              "xml.etree.ElementTree", "email.message", "email.parser", "json.decoder",
              "json.encoder", "asyncio.locks", "asyncio.queues", "multiprocessing.pool",
              "importlib.metadata", "zoneinfo", "graphlib", "numbers", "abc", "io", "tomllib",
              "mimetypes", "filecmp", "sysconfig", "platform", "getpass", "webbrowser",
              "imghdr", "sndhdr", "chunk", "token", "symtable", "compileall", "py_compile",
              "modulefinder", "runpy", "site", "venv", "zipapp", "zipimport", "ssl", "socketserver",
              "xmlrpc.client", "ipaddress", "string", "struct", "reprlib", "types")
  records, seen = [], set()
  for name in dict.fromkeys(defaults if modules is None else modules):
    try:
      with warnings.catch_warnings():  # some of these are deprecated: still fine to read
        warnings.simplefilter("ignore")
        module = importlib.import_module(name)
    except Exception:  # pylint: disable=broad-except  # missing on this Python: skip it
      continue
    functions = []
    for attr in sorted(dir(module)):
      obj = getattr(module, attr)
      if attr.startswith("_"):
        continue
      if inspect.isfunction(obj):
        functions.append((f"{name}.{attr}", obj))
      elif inspect.isclass(obj) and obj.__module__ == module.__name__:
        functions += [(f"{name}.{attr}.{m}", f) for m, f in sorted(vars(obj).items())
                      if not m.startswith("_") and inspect.isfunction(f)]
    for qualname, fn in functions:
      doc = inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0].strip()
      params = _source_signature(fn)
      if params is None:
        continue
      signature = f"{qualname}{params}"
      if len(doc) < 20 or signature in seen:
        continue
      seen.add(signature)
      records.append({"instruction": "Explain what this Python function does.",
                      "input": signature, "output": re.sub(r"\s+", " ", doc)})
  return records


def stdlib_docstring_pairs(path: str) -> str:
  """Write preference pairs from the same instructions: the function's own docstring is
  chosen; rejected, in turn, is another function's docstring (picked by a seeded
  shuffle), the docstring with its words shuffled, or the docstring cut off after a
  third of its words. The last two a small model learns to spot; the first is hard."""
  records = _stdlib_docstring_records()
  rng = random.Random(0)
  others = list(range(len(records)))
  rng.shuffle(others)
  lines = []
  for i, r in enumerate(records):
    words = r["output"].split()
    if i % 3 == 1 and len(set(words)) > 2:
      shuffled = list(words)
      while shuffled == words:
        rng.shuffle(shuffled)
      rejected = " ".join(shuffled)
    elif i % 3 == 2 and len(words) >= 6:
      rejected = " ".join(words[:len(words) // 3])
    else:
      rejected = records[others[i]]["output"]
      if rejected == r["output"]:
        rejected = records[others[i - 1]]["output"]
    lines.append(json.dumps({"prompt": f"{r['instruction']}\n\n{r['input']}",
                             "chosen": r["output"], "rejected": rejected}) + "\n")
  fileio.atomic_write(path, "".join(lines))
  return path


BUILTINS = {"stdlib_docstrings": stdlib_docstrings,
            "stdlib_docstring_pairs": stdlib_docstring_pairs}


def resolve_builtin(spec: str, workdir: str, key: str) -> list[str]:
  """`builtin:NAME:train|eval` -> the generated file's split, written under the workdir.
  Splits are by hash of the record, 1 in 10 to eval."""

  _, name, split = (spec.split(":") + ["train"])[:3]
  if name not in (*BUILTINS, *world.BUILTINS) or split not in ("train", "eval"):
    raise ConfigError(f"{key}={spec!r}: builtin data is builtin:NAME[:train|eval] with NAME in "
                      f"{', '.join((*BUILTINS, *world.BUILTINS))}")
  folder = os.path.join(workdir, "builtin")
  if name in world.BUILTINS:  # the task world splits by question, alike for every kind
    part = os.path.join(folder, f"{name}.{split}.jsonl")
    if not os.path.exists(part):
      world.write(name, split, part)
    return [part]
  full = os.path.join(folder, f"{name}.jsonl")
  if not os.path.exists(full):
    BUILTINS[name](full)
  part = os.path.join(folder, f"{name}.{split}.jsonl")
  if not os.path.exists(part):
    with open(full, encoding="utf-8") as f:  # atomic: every process writes its copy
      fileio.atomic_write(part, "".join(line for line in f if (
          zlib.crc32(line.encode()) % 10 == 0) == (split == "eval")))
  return [part]


def spec_files(spec: str, workdir: str, key: str) -> list[str]:
  """The files a data key names: built-in generated data (`builtin:NAME:SPLIT`, written
  into the workdir) or comma-separated globs (`fileio.expand_globs`)."""
  if spec.strip().startswith(BUILTIN_PREFIX):
    return resolve_builtin(spec.strip(), workdir, key)
  return fileio.expand_globs(spec, key)


