"""Hugging Face tokenizer files for an export, made from the run's tokenizer so that
transformers and vLLM encode, render chats and stop generating as jaxlm does.

    write_sentencepiece(folder, tok, "jaxlm", vocab_size=512, max_len=2048)
    write_generation_config(folder, tok, "chatml", vocab_size=512)  # a HF tokenizer's export

A SentencePiece model (the one a run trains) becomes `tokenizer.json`: a fast tokenizer
whose ids are SentencePiece's (its dummy prefix, byte fallback and user-defined pieces
included), BOS added in front as jaxlm trains, no EOS. `tokenizer_config.json` marks the
chat role markers special and holds the run's chat template in Jinja, which renders
`bos_token` and then exactly jaxlm's text. `generation_config.json` ends generation at EOS
and at the template's end-of-turn marker, and suppresses the ids past the tokenizer's
vocabulary (the model's padding), which jaxlm never samples either.

Where the fast tokenizer still differs from SentencePiece: the text of a control token
(`<s>`, `</s>`, `<pad>`, `<unk>`) is that token to transformers, as in every Hugging Face
tokenizer, and a text that is one user-defined piece and nothing else has no dummy-prefix
piece before it. A unigram model may break ties between equal-scoring splits otherwise
(checked on probe strings at export, with a warning).
"""

from __future__ import annotations

import json
import os
import re

from sentencepiece import sentencepiece_model_pb2

from jaxlm import console, fileio
from jaxlm.data import sft, tokenizer as tokenizer_lib
from jaxlm.errors import ConfigError, HFError

# Pieces shown as special (skip_special_tokens drops them): every chat template's markers.
ROLE_MARKERS = tuple(dict.fromkeys(
    tokenizer_lib.SPECIAL_TOKENS + tuple(m for t in sft.TEMPLATES.values() for m in t.specials)))
_KINDS = sentencepiece_model_pb2.ModelProto.SentencePiece
# Strings the fast tokenizer must encode as SentencePiece does, checked at every export.
_PROBES = ("Hello, world!", "  two leading spaces", "tabs\tand\nnewlines\n\n", "trailing   ",
           "def f(x):\n        return {'a': [1, 2.5]}  # note\n", "naïve café 北京 😀 ∑", "", " ",
           "\n", "1234567890 3.14159", "▁literal", "<|x|> <|>",
           *(" " * n + "x = 1\n" + "\t" * (n % 3) + "y" for n in range(1, 25)))


def _proto(tok) -> sentencepiece_model_pb2.ModelProto:
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tok.sp.serialized_model_proto())
  return proto


def _model(proto, models):
  """The SentencePiece model as a `tokenizers` BPE (merges ranked by the merged piece's
  score, as SentencePiece merges) or Unigram model, byte fallback as it has it."""
  spec = proto.trainer_spec
  if spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
    return models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=spec.unk_id,
                          byte_fallback=spec.byte_fallback)
  if spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
    kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(spec.model_type).lower()
    raise HFError(f"a SentencePiece {kind} model (not bpe or unigram) has "
                  f"no tokenizer.json form here")
  normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _KINDS.NORMAL}
  ranked = []
  for piece, (score, i) in normal.items():
    for k in range(1, len(piece)):
      if piece[:k] in normal and piece[k:] in normal:
        ranked.append((-score, i, k, piece[:k], piece[k:]))
  return models.BPE(vocab={p.piece: i for i, p in enumerate(proto.pieces)},
                    merges=[(left, right) for *_, left, right in sorted(ranked)],
                    unk_token=proto.pieces[spec.unk_id].piece, fuse_unk=True,
                    byte_fallback=spec.byte_fallback)


def _normalizer(proto, normalizers, regex):
  """SentencePiece's normalization: its character map, extra whitespace removed, the
  dummy prefix, spaces as ▁. User-defined pieces are matched after it (normalized added
  tokens), as SentencePiece matches them, so the dummy prefix is the whole text's, never
  one piece's: a piece's own text normalizes to itself."""
  spec = proto.normalizer_spec
  steps = []
  if spec.precompiled_charsmap:
    steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
  if spec.remove_extra_whitespaces:
    steps += [normalizers.Replace(regex(r"\A +| +\z"), ""),
              normalizers.Replace(regex(" {2,}"), " ")]
  if spec.add_dummy_prefix:
    steps.append(normalizers.Prepend("▁"))
  if spec.escape_whitespaces:
    steps.append(normalizers.Replace(" ", "▁"))
  if spec.add_dummy_prefix:
    for p in proto.pieces:
      if p.type == _KINDS.USER_DEFINED:
        text = p.piece.replace(" ", "▁") if spec.escape_whitespaces else p.piece
        steps.append(normalizers.Replace(regex(r"\A▁" + re.escape(text) + r"\z"), text))
  return normalizers.Sequence(steps)


def fast_tokenizer(tok):
  """`tok` (a SentencePiece `data.tokenizer.Tokenizer`) as a `tokenizers.Tokenizer` with the
  same ids, BOS added in front by its post-processor."""
  try:
    import tokenizers  # lazy: only for exporting a SentencePiece tokenizer
  except ImportError:
    raise HFError("exporting a SentencePiece tokenizer to Hugging Face needs the `tokenizers` "
                  "package (pip install tokenizers)") from None
  proto = _proto(tok)
  if proto.trainer_spec.treat_whitespace_as_suffix or proto.normalizer_spec.normalization_rule_tsv:
    raise HFError(f"{tok.path}: a SentencePiece model with treat_whitespace_as_suffix or a "
                  f"normalization_rule_tsv has no tokenizer.json form here")
  fast = tokenizers.Tokenizer(_model(proto, tokenizers.models))
  fast.normalizer = _normalizer(proto, tokenizers.normalizers, tokenizers.Regex)
  steps = [tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.ByteFallback(),
           tokenizers.decoders.Fuse()]
  if proto.normalizer_spec.add_dummy_prefix:  # after Fuse: only the text's first space
    steps.append(tokenizers.decoders.Strip(" ", 1, 0))
  fast.decoder = tokenizers.decoders.Sequence(steps)
  added = []
  for p in proto.pieces:
    if p.type in (_KINDS.CONTROL, _KINDS.UNKNOWN):
      added.append(tokenizers.AddedToken(p.piece, special=True, normalized=False))
    elif p.type == _KINDS.USER_DEFINED:
      added.append(tokenizers.AddedToken(p.piece, special=p.piece in ROLE_MARKERS,
                                         normalized=True))
  fast.add_special_tokens([t for t in added if t.special])
  fast.add_tokens([t for t in added if not t.special])
  bos = proto.pieces[tok.bos_id].piece
  fast.post_processor = tokenizers.processors.TemplateProcessing(
      single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.bos_id)])
  return fast


def _check_probes(tok, fast, template) -> None:
  """A warning when the fast tokenizer encodes any probe string (and a chat rendered with
  `template`) otherwise than SentencePiece does."""
  probes = list(_PROBES)
  if template is not None:
    turns = [("system", "Be brief."), ("user", "Hi  there\n"), ("assistant", " ok.")]
    probes += [template.begin + "".join(template.header.format(role=r) + t + template.end
                                        for r, t in turns)]
  differ = [p for p in probes if fast.encode(p, add_special_tokens=False).ids != tok.encode(p)]
  if differ:
    console.warning(f"{tok.path}: the exported tokenizer.json encodes {len(differ)} of "
                    f"{len(probes)} probe strings otherwise than SentencePiece (first: "
                    f"{differ[0][:40]!r}); transformers' ids may differ from jaxlm's")


def _literal(text: str) -> str:
  """`text` as a Jinja string literal (Jinja reads Python's escapes)."""
  return json.dumps(text, ensure_ascii=False)


def chat_jinja(template: sft.ChatTemplate) -> str:
  """A Hugging Face chat template rendering what `template` renders, after `bos_token`:
  transformers and vLLM tokenize a rendered chat without adding special tokens, so BOS
  is in the text. (jaxlm renders it with bos_token="" and adds BOS as an id.)"""
  if template.jinja:
    return template.jinja
  head, _, tail = template.header.partition("{role}")
  roles = "[" + ", ".join(map(_literal, sft.ROLES)) + "]"
  refuse = _literal(f"this model's chat template ({template.name}) takes the roles "
                    f"{', '.join(sft.ROLES)}")
  return ("{{ bos_token }}" + (f"{{{{ {_literal(template.begin)} }}}}" if template.begin else "")
          + "{% for message in messages %}"
          f"{{% if message['role'] not in {roles} %}}"
          f"{{{{ raise_exception({refuse}) }}}}{{% endif %}}"
          f"{{{{ {_literal(head)} + message['role'] + {_literal(tail)} + message['content'] + "
          f"{_literal(template.end)} }}}}"
          "{% endfor %}"
          f"{{% if add_generation_prompt %}}{{{{ {_literal(head + 'assistant' + tail)} }}}}"
          "{% endif %}")


def _template(tok, name: str, *, warn: bool) -> sft.ChatTemplate | None:
  """The run's chat template (data.chat_template) if `tok` can render it: its markers
  single tokens, or its Jinja readable; else None (with `warn`, saying why)."""
  try:
    return sft.chat_template(name, tok)
  except ConfigError as e:
    if warn:
      console.warning(f"the export has no chat template: {e}")
    return None


def end_of_turn_id(tok, template: sft.ChatTemplate | None) -> int | None:
  """The id of the marker that ends an assistant turn, when it is one token."""
  ids = sft.end_of_turn_ids(tok, template) if template is not None else ()
  return ids[0] if len(ids) == 1 else None


def generation_config(tok, template: sft.ChatTemplate | None, vocab_size: int) -> dict:
  """generation_config.json: BOS/EOS/pad ids, EOS and the end-of-turn id as the ids that
  end generation, and the model's padding ids (past the tokenizer's) never generated."""
  eos = [tok.eos_id]
  end = end_of_turn_id(tok, template)
  if end is not None and end != tok.eos_id:
    eos.append(end)
  out = {"bos_token_id": tok.bos_id, "eos_token_id": eos, "pad_token_id": tok.pad_id}
  if vocab_size > tok.vocab_size:
    out["suppress_tokens"] = list(range(tok.vocab_size, vocab_size))
  return out


def write_generation_config(folder: str, tok, template_name: str, vocab_size: int) -> None:
  """generation_config.json in `folder` for a tokenizer and the run's chat template."""
  template = _template(tok, template_name, warn=False)  # then EOS alone ends generation
  fileio.atomic_write_json(os.path.join(folder, "generation_config.json"),
                           generation_config(tok, template, vocab_size))


def _token(piece: str, special: bool, normalized: bool) -> dict:
  return {"content": piece, "lstrip": False, "normalized": normalized, "rstrip": False,
          "single_word": False, "special": special}


def tokenizer_config(tok, fast, template: sft.ChatTemplate | None, max_len: int) -> dict:
  """tokenizer_config.json for `fast` (from `fast_tokenizer(tok)`)."""
  piece = tok.sp.id_to_piece
  added = fast.get_added_tokens_decoder()
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
      "unk_token": piece(tok.sp.unk_id()),
      "pad_token": piece(tok.sp.pad_id()) if tok.sp.pad_id() >= 0 else None,
      "add_bos_token": True, "add_eos_token": False,  # as jaxlm trains: BOS text EOS
      "additional_special_tokens": [t.content for t in added.values()
                                    if t.special and t.content in ROLE_MARKERS],
      "added_tokens_decoder": {str(i): _token(t.content, t.special, t.normalized)
                               for i, t in sorted(added.items())},
      "clean_up_tokenization_spaces": False,
      "model_max_length": max_len,
  }
  if template is not None:
    config["chat_template"] = chat_jinja(template)
  return config


def write_sentencepiece(folder: str, tok, template_name: str, *, vocab_size: int,
                        max_len: int) -> list[str]:
  """tokenizer.json, tokenizer_config.json, special_tokens_map.json and
  generation_config.json in `folder` for a SentencePiece tokenizer and the run's chat
  template (data.chat_template); their names. A model `fast_tokenizer` can't convert
  (or no `tokenizers` package) gets generation_config.json alone, with a warning: the
  export then needs sentencepiece to load its tokenizer.model, as it always did."""
  template = _template(tok, template_name, warn=True)
  generation = generation_config(tok, template, vocab_size)
  fileio.atomic_write_json(os.path.join(folder, "generation_config.json"), generation)
  try:
    fast = fast_tokenizer(tok)
  except HFError as e:
    console.warning(f"the export has no tokenizer.json: {e}")
    return ["generation_config.json"]
  _check_probes(tok, fast, None if template is None or template.jinja else template)
  config = tokenizer_config(tok, fast, template, max_len)
  special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token",
                                    "additional_special_tokens") if config[k] is not None}
  fileio.atomic_write(os.path.join(folder, "tokenizer.json"), fast.to_str(pretty=True))
  fileio.atomic_write_json(os.path.join(folder, "tokenizer_config.json"), config)
  fileio.atomic_write_json(os.path.join(folder, "special_tokens_map.json"), special)
  return ["generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json"]
