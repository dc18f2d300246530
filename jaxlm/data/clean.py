"""Document cleaning: Unicode normalization, Gopher/C4-style quality filters, PII scrubbing.

Pure functions of strings and plain settings (a dict or ConfigDict), so they run in
worker processes and are tested directly. Each quality filter has a name; a document
it rejects is counted under that name.
"""

from __future__ import annotations

import collections
import re
import unicodedata

import numpy as np


# Control characters other than tab and newline (C0, DEL, C1).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize(text: str, s) -> str:
  """NFC, then control characters dropped, then whitespace tidied (each switchable).

  Whitespace tidying keeps indentation (code): it turns CRLF and CR into LF, strips
  trailing spaces on each line, collapses runs of blank lines to one, and strips the
  document's ends.
  """
  if s["nfc"]:
    text = unicodedata.normalize("NFC", text)
  if s["whitespace"]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
  if s["control_chars"]:
    text = _CONTROL.sub("", text)
  if s["whitespace"]:
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_RUNS.sub("\n\n", text).strip()
  return text


# ---------------------------------------------------------------------------------------
# Quality filters (Rae et al. 2021, "Gopher", appendix A; Raffel et al. 2020, "C4").

_WORD = re.compile(r"\S+")
_TERMINAL = ('.', '!', '?', '"', "'", '\u201d', '\u2019', ':', ';', ')')


def _ngram_repetition(words: list[str], lengths: np.ndarray, n: int) -> tuple[float, float]:
  """(fraction of characters in the most common n-gram, fraction of characters in
  n-grams that occur more than once), over word n-grams as in Gopher."""
  if len(words) < n:
    return 0.0, 0.0
  grams = list(zip(*(words[i:] for i in range(n))))
  counts = collections.Counter(grams)
  total_chars = lengths.sum()
  top_gram, top_count = counts.most_common(1)[0]
  top = sum(len(w) for w in top_gram) * top_count / total_chars if top_count > 1 else 0.0
  repeated_start = np.fromiter((counts[g] > 1 for g in grams), bool, len(grams))
  covered = np.convolve(repeated_start, np.ones(n, bool))[:len(words)] > 0  # word in any repeat
  return top, lengths[covered].sum() / total_chars


def _word_count(words, lines, s):
  return s["min_words"] <= len(words) <= s["max_words"]


def _mean_word_length(words, lines, s):
  mean = sum(len(w) for w in words) / max(len(words), 1)
  return s["min_mean_word_length"] <= mean <= s["max_mean_word_length"]


def _symbol_ratio(words, lines, s):
  text = "\n".join(lines)  # no symbol spans whitespace: counting the text counts the words
  symbols = text.count("#") + text.count("...") + text.count("\u2026")
  return symbols / max(len(words), 1) <= s["max_symbol_ratio"]


def _punctuation_lines(words, lines, s):
  nonempty = [ln.rstrip() for ln in lines if ln.strip()]
  ending = sum(ln.endswith(_TERMINAL) for ln in nonempty)
  return ending / max(len(nonempty), 1) >= s["min_punctuation_lines"]


def _repeated_lines(words, lines, s):
  nonempty = [ln.strip() for ln in lines if ln.strip()]
  if not nonempty:
    return True
  counts = collections.Counter(nonempty)
  duplicated = sum(c for c in counts.values() if c > 1)
  return duplicated / len(nonempty) <= s["max_duplicate_lines"]


def _repeated_ngrams(words, lines, s):
  lengths = np.fromiter(map(len, words), np.int64, len(words))
  top, _ = _ngram_repetition(words, lengths, 2)
  _, dup = _ngram_repetition(words, lengths, 5)
  return top <= s["max_top_2gram"] and dup <= s["max_duplicate_5grams"]


_ALPHA = re.compile(r"[^\W\d_]")


def _alpha_words(words, lines, s):
  alpha = sum(1 for w in words if _ALPHA.search(w))
  return alpha / max(len(words), 1) >= s["min_alpha_words"]


# In the order they are applied; a document is counted under the first that rejects it.
FILTERS = {
    "word_count": _word_count,
    "mean_word_length": _mean_word_length,
    "symbol_ratio": _symbol_ratio,
    "punctuation_lines": _punctuation_lines,
    "repeated_lines": _repeated_lines,
    "repeated_ngrams": _repeated_ngrams,
    "alpha_words": _alpha_words,
}


def parse_filter_names(spec: str, key: str) -> tuple[str, ...]:
  """"all" | "none" | comma-separated filter names -> names, in application order."""
  spec = spec.strip()
  if spec == "all":
    return tuple(FILTERS)
  if spec in ("none", ""):
    return ()
  names = [n.strip() for n in spec.split(",") if n.strip()]
  unknown = [n for n in names if n not in FILTERS]
  if unknown:
    raise ValueError(f"{key}={spec!r}: unknown filter {unknown[0]!r}; use all, none, or "
                     f"names from {', '.join(FILTERS)}")
  return tuple(n for n in FILTERS if n in names)


def first_failed_filter(text: str, names, s) -> str | None:
  """The name of the first filter in `names` that rejects `text`, or None."""
  if not names:
    return None
  words = _WORD.findall(text)
  lines = text.split("\n")
  for name in names:
    if not FILTERS[name](words, lines, s):
      return name
  return None


# ---------------------------------------------------------------------------------------
# PII scrubbing.

PII_PATTERNS = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b"),
    # IPv4 with every octet in 0-255 (before phones: a dotted quad is not a phone number).
    "ip": re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                     r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])"),
    # International (+CC ...) or North American numbers with separators: 10-15 digits in
    # groups, so years, prices and plain counts are left alone.
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{2,4})[ .-]"
                        r"\d{3,4}[ .-]\d{3,4}(?![\w-])"),
}


def scrub_pii(text: str, placeholders) -> tuple[str, dict[str, int]]:
  """Replace e-mail addresses, IPv4 addresses and phone numbers with placeholders.

  `placeholders` maps kind -> replacement; a kind missing or empty is left alone.
  Returns the text and {kind: replacements made}.
  """
  counts = {}
  for kind, pattern in PII_PATTERNS.items():
    replacement = placeholders.get(kind) or ""
    if not replacement:
      continue
    text, n = pattern.subn(replacement, text)
    if n:
      counts[kind] = n
  return text, counts
