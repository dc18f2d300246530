"""SentencePiece tokenizers: load a `.model`, or train one from text.

A tokenizer's special tokens (role markers, PII placeholders) are single ids wherever
their text occurs in a document (`encode`), as pretraining wants. In a conversation only
the chat template may insert them: `encode_parts` encodes the user's content with
special-token parsing off, so a literal `<|user|>` in a message is text, not a turn."""

from __future__ import annotations

from collections.abc import Iterable
import io
import os
import re

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from jaxlm import fileio
from jaxlm.errors import ConfigError, MarkerError


# Ids fixed by the tokenizers jaxlm trains; loaded models keep their own.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Chat-role markers that later stages format conversations with.
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def _unreadable(key: str, path: str, what: str, error: BaseException) -> ConfigError:
  if isinstance(error, (KeyboardInterrupt, SystemExit)):
    raise error
  reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
  return ConfigError(f"{key}: {path} is not {what} ({reason.split('] ')[-1]})")


class _Specials:
  """Content encoding shared by both tokenizer kinds. Subclasses set `special_ids`
  ({id: text}) and define `_pieces(text)` -> [(id, byte start, byte end)] (the text
  encoded whole, specials matched) and `_as_text(text)` -> [(id, byte offset)] (the text
  with special-token parsing off)."""

  special_ids: dict[int, str]

  def special_pattern(self):
    """A regex matching the text of any special token (None when there are none)."""
    if not hasattr(self, "_pattern"):
      texts = sorted(set(self.special_ids.values()), key=len, reverse=True)
      self._pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
      self._ids_of = {}  # a text -> its ids (a vocabulary may hold one text twice)
      for i, t in self.special_ids.items():
        self._ids_of.setdefault(t, set()).add(i)
    return self._pattern

  def encode_parts(self, parts) -> tuple[list[int], list[int]]:
    """Ids of the joined text of `parts` [(text, is_content)], and the UTF-8 byte offset
    where each starts. The text is encoded whole, as `encode` would, except that a
    special token touching a content part is encoded as ordinary text (decoding gives
    the content back exactly). Raises MarkerError when content keeps a marker that a
    template part holds from being its one id."""
    text = "".join(t for t, _ in parts)
    starts, content, at = [], [], 0
    for t, is_content in parts:
      size = len(t.encode("utf-8"))
      starts.append(at)
      if is_content and size:
        content.append((at, at + size))
      at += size
    raw = text.encode("utf-8")
    ids, offsets = [], []
    for i, start, end in self._pieces(text):
      if i in self.special_ids and any(s < end and start < e for s, e in content):
        for j, rel in self._as_text(raw[start:end].decode("utf-8")):
          ids.append(j)
          offsets.append(start + rel)
      else:
        ids.append(i)
        offsets.append(start)
    pattern = self.special_pattern()
    if pattern is not None:
      have = set(zip(offsets, ids))
      for (t, is_content), start in zip(parts, starts):
        if is_content:
          continue
        for m in pattern.finditer(t):
          at = start + len(t[:m.start()].encode("utf-8"))
          if not any((at, i) in have for i in self._ids_of[m.group()]):
            raise MarkerError(f"the template's {m.group()!r} does not stay one token next "
                              f"to the content beside it")
    return ids, offsets


class Tokenizer(_Specials):
  """A SentencePiece model with the ids training code needs."""

  def __init__(self, path: str, key: str = "tokenizer"):
    if not os.path.isfile(path):
      raise ConfigError(f"{key}: no such file {path}")
    self.path = path
    try:
      self.sp = spm.SentencePieceProcessor(model_file=path)
    except Exception as e:  # pylint: disable=broad-except  # SentencePiece's own reason
      raise _unreadable(key, path, "a SentencePiece model", e) from None
    self.vocab_size = self.sp.get_piece_size()
    self.bos_id = self.sp.bos_id()
    self.eos_id = self.sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ConfigError(f"{key}: {path} has no BOS or EOS piece (bos_id={self.bos_id}, "
                        f"eos_id={self.eos_id}); documents need both")
    pad = self.sp.pad_id()
    self.pad_id = pad if pad >= 0 else 0
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(self.sp.serialized_model_proto())
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    # user-defined symbols: SentencePiece matches them wherever their text occurs
    self.special_ids = {i: p.piece for i, p in enumerate(proto.pieces)
                        if p.type == kinds.USER_DEFINED}
    self._byte_ids = {int(p.piece[3:5], 16): i for i, p in enumerate(proto.pieces)
                      if p.type == kinds.BYTE}

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """Ids and the UTF-8 byte offset in `text` where each token starts."""
    pieces = self.sp.encode(text, out_type="proto").pieces
    return [p.id for p in pieces], [p.begin for p in pieces]

  def _pieces(self, text):
    return [(p.id, p.begin, p.end) for p in self.sp.encode(text, out_type="proto").pieces]

  def _as_text(self, text):
    """Byte pieces (byte-fallback models); else one piece per character, as text the
    model has no piece for would be."""
    raw = text.encode("utf-8")
    if all(b in self._byte_ids for b in raw):
      return [(self._byte_ids[b], k) for k, b in enumerate(raw)]
    out, at = [], 0
    for ch in text:
      out.append((self.sp.piece_to_id(ch), at))
      at += len(ch.encode("utf-8"))
    return out

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])


class HFTokenizer(_Specials):
  """A Hugging Face `tokenizer.json` (through the `tokenizers` package) with the same face
  as `Tokenizer`. BOS/EOS come from `tokenizer_config.json` beside it; a tokenizer with
  no BOS (Qwen2, for one) starts documents with its EOS, as GPT-2 does."""

  def __init__(self, path: str, key: str = "tokenizer"):
    try:
      import tokenizers  # lazy: only for tokenizer.json (HF tokenizers)
    except ImportError:
      raise ConfigError(f"tokenizer {path}: reading tokenizer.json needs the `tokenizers` "
                       f"package (pip install tokenizers)") from None
    if not os.path.isfile(path):
      raise ConfigError(f"{key}: no such file {path}")
    self.path = path
    try:
      self.tok = tokenizers.Tokenizer.from_file(path)
    except BaseException as e:  # pylint: disable=broad-except  # its reason, or a Rust panic
      if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
        raise  # a signal (the pipeline's SIGTERM), an exit: not the file's fault
      raise _unreadable(key, path, "a Hugging Face tokenizer.json", e) from None
    self._plain = None  # the same tokenizer with special-token parsing off, made when needed
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    self.special_ids = {i: t.content for i, t in self.tok.get_added_tokens_decoder().items()
                        if t.special}
    special = {}
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")

    def read(json_path):
      try:
        return fileio.read_json(json_path, dict)
      except (ValueError, OSError) as e:
        raise ConfigError(f"{key}: {e}") from None

    if os.path.isfile(config_path):
      special = read(config_path)

    def token_id(name):
      value = special.get(name)
      if isinstance(value, dict):  # {"content": "<s>", ...}
        value = value.get("content")
      return self.tok.token_to_id(value) if isinstance(value, str) and value else None

    self.eos_id = token_id("eos_token")
    if self.eos_id is None:  # GPT-2 on the hub keeps it in special_tokens_map.json only
      special_map = os.path.join(os.path.dirname(path), "special_tokens_map.json")
      if os.path.isfile(special_map):
        special = {**read(special_map), **{k: v for k, v in special.items() if v}}
        self.eos_id = token_id("eos_token")
    if self.eos_id is None:
      raise ConfigError(f"{key}: {path} has no eos_token in {config_path} or "
                        f"special_tokens_map.json; documents need one")
    bos = token_id("bos_token")
    self.bos_id = self.eos_id if bos is None else bos
    pad = token_id("pad_token")
    self.pad_id = self.eos_id if pad is None else pad

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """Ids and the UTF-8 byte offset in `text` where each token starts."""
    ids, starts, _ = zip(*self._pieces(text)) if text else ((), (), ())
    return list(ids), list(starts)

  def _pieces(self, text, tok=None):
    enc = (tok or self.tok).encode(text, add_special_tokens=False)
    char_to_byte = [0]
    for ch in text:
      char_to_byte.append(char_to_byte[-1] + len(ch.encode("utf-8")))
    return [(i, char_to_byte[s], char_to_byte[e]) for i, (s, e) in zip(enc.ids, enc.offsets)]

  def _as_text(self, text):
    if self._plain is None:
      import tokenizers  # lazy: only for tokenizer.json (HF tokenizers)
      self._plain = tokenizers.Tokenizer.from_str(self.tok.to_str())
      self._plain.encode_special_tokens = True
    return [(i, start) for i, start, _ in self._pieces(text, self._plain)]

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load(path: str, key: str = "data.tokenizer"):
  """A SentencePiece `.model` or a Hugging Face `tokenizer.json`, by its name. `key`
  (the config key or flag that named the file: the run's tokenizer, data.tokenizer or the
  one init_from brings, unless told otherwise) leads its errors."""
  return HFTokenizer(path, key) if path.endswith(".json") else Tokenizer(path, key)


def train(texts: Iterable[str], path: str, vocab_size: int, model_type: str = "bpe",
          special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> Tokenizer:
  """Train a byte-fallback SentencePiece model on `texts` and write it to `path`.

  Whitespace is kept as written (code indentation matters), digits are split, and
  characters outside the vocabulary (newlines among them) fall back to byte pieces.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  model = io.BytesIO()
  # SentencePiece trains on sentences: give it non-empty lines.
  lines = (line for text in texts for line in text.split("\n") if line.strip())
  try:
    _train_spm(lines, model, vocab_size, model_type, special_tokens)
  except RuntimeError as e:  # SentencePiece's own reason, on one line
    raise ValueError(f"tokenizer training failed (vocab_size={vocab_size}): "
                     f"{str(e).splitlines()[-1].split('] ')[-1]}") from None
  fileio.atomic_write(path, model.getvalue())
  tok = Tokenizer(path)
  vocab = os.path.splitext(path)[0] + ".vocab"  # SentencePiece's own layout: piece<TAB>score
  fileio.atomic_write(vocab, "".join(f"{tok.sp.id_to_piece(i)}\t{tok.sp.get_score(i):g}\n"
                                     for i in range(tok.vocab_size)))
  return tok


def _train_spm(lines, model, vocab_size, model_type, special_tokens):
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines, model_writer=model, vocab_size=vocab_size,
      model_type=model_type, byte_fallback=True, split_digits=True,
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
      normalization_rule_name="identity", character_coverage=0.9995,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      user_defined_symbols=list(special_tokens), hard_vocab_limit=False,
      max_sentence_length=16384, num_threads=os.cpu_count() or 1, minloglevel=2)
