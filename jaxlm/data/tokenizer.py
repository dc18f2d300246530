"""SentencePiece tokenizers: load a `.model`, or train one from text."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable

import sentencepiece as spm

from jaxlm.config import ConfigError

# Ids fixed by the tokenizers jaxlm trains; loaded models keep their own.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Chat-role markers that later stages format conversations with.
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class Tokenizer:
  """A SentencePiece model with the ids training code needs."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise ConfigError(f"tokenizer: no such file {path}")
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self.sp.get_piece_size()
    self.bos_id = self.sp.bos_id()
    self.eos_id = self.sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ConfigError(f"tokenizer {path}: no BOS or EOS piece (bos_id={self.bos_id}, "
                       f"eos_id={self.eos_id}); documents need both")
    pad = self.sp.pad_id()
    self.pad_id = pad if pad >= 0 else 0

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """Ids and the UTF-8 byte offset in `text` where each token starts."""
    pieces = self.sp.encode(text, out_type="proto").pieces
    return [p.id for p in pieces], [p.begin for p in pieces]

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (through the `tokenizers` package) with the same face
  as `Tokenizer`. BOS/EOS come from `tokenizer_config.json` beside it; a tokenizer with
  no BOS (Qwen2, for one) starts documents with its EOS, as GPT-2 does."""

  def __init__(self, path: str):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ConfigError(f"tokenizer {path}: reading tokenizer.json needs the `tokenizers` "
                       f"package (pip install tokenizers)") from None
    if not os.path.isfile(path):
      raise ConfigError(f"tokenizer: no such file {path}")
    self.path = path
    self.tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    special = {}
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.isfile(config_path):
      with open(config_path, encoding="utf-8") as f:
        special = json.load(f)

    def token_id(key):
      value = special.get(key)
      if isinstance(value, dict):  # {"content": "<s>", ...}
        value = value.get("content")
      return self.tok.token_to_id(value) if value else None

    self.eos_id = token_id("eos_token")
    if self.eos_id is None:  # GPT-2 on the hub keeps it in special_tokens_map.json only
      special_map = os.path.join(os.path.dirname(path), "special_tokens_map.json")
      if os.path.isfile(special_map):
        with open(special_map, encoding="utf-8") as f:
          special = {**json.load(f), **{k: v for k, v in special.items() if v}}
        self.eos_id = token_id("eos_token")
    if self.eos_id is None:
      raise ConfigError(f"tokenizer {path}: no eos_token in {config_path} or "
                       f"special_tokens_map.json; documents need one")
    bos = token_id("bos_token")
    self.bos_id = self.eos_id if bos is None else bos
    pad = token_id("pad_token")
    self.pad_id = self.eos_id if pad is None else pad

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """Ids and the UTF-8 byte offset in `text` where each token starts."""
    enc = self.tok.encode(text, add_special_tokens=False)
    char_to_byte = [0]
    for ch in text:
      char_to_byte.append(char_to_byte[-1] + len(ch.encode("utf-8")))
    return enc.ids, [char_to_byte[start] for start, _ in enc.offsets]

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load(path: str):
  """A SentencePiece `.model` or a Hugging Face `tokenizer.json`, by its name."""
  return HFTokenizer(path) if path.endswith(".json") else Tokenizer(path)


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
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, path)
  tok = Tokenizer(path)
  vocab = os.path.splitext(path)[0] + ".vocab"  # SentencePiece's own layout: piece<TAB>score
  with open(vocab, "w", encoding="utf-8") as f:
    for i in range(tok.vocab_size):
      f.write(f"{tok.sp.id_to_piece(i)}\t{tok.sp.get_score(i):g}\n")
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
