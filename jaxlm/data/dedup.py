"""Exact and near-duplicate detection: content hashes, MinHash signatures, LSH buckets.

Signatures are computed in worker processes (`minhash`); one `NearDuplicateIndex` in the
main process sees documents in input order, so which copy is kept (the first) does not
depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np


_WORDS = re.compile(r"\w+")


def content_hash(text: str) -> bytes:
  """16-byte hash of the exact text."""
  return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The (a, b) of `num_perm` multiply-add-shift hashes of 32-bit keys, from `seed`:
  h(x) = ((a*x + b) mod 2^64) >> 32 with a odd (Dietzfelbinger's universal family)."""
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
  b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2)
  return a, b


def shingles(text: str, n: int) -> np.ndarray:
  """Unique 32-bit hashes of the lower-cased word n-grams of `text` (at least one)."""
  words = _WORDS.findall(text.lower())
  if len(words) < n:
    grams = {" ".join(words)}
  else:
    grams = {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}
  return np.fromiter((zlib.crc32(g.encode("utf-8")) for g in grams), np.uint64, len(grams))


def minhash(text: str, n: int, perms: tuple[np.ndarray, np.ndarray],
            chunk: int = 4096) -> np.ndarray:
  """MinHash signature [num_perm] (uint32) of the word n-gram shingle set."""
  a, b = perms
  x = shingles(text, n)
  signature = np.full(a.shape, np.uint32(0xFFFFFFFF), np.uint32)
  with np.errstate(over="ignore"):  # the products wrap modulo 2^64 by design
    for start in range(0, x.size, chunk):
      h = ((a[:, None] * x[None, start:start + chunk] + b[:, None]) >> np.uint64(32))
      signature = np.minimum(signature, h.min(axis=1).astype(np.uint32))
  return signature


def lsh_shape(num_perm: int, threshold: float) -> tuple[int, int]:
  """(bands, rows), bands*rows = num_perm, with the S-curve midpoint (1/b)^(1/r) as high
  as possible without passing the Jaccard `threshold`: candidates err towards too many
  (each is then checked against the threshold), so few true pairs are missed."""
  options = [(b, num_perm // b) for b in range(1, num_perm + 1) if num_perm % b == 0]
  midpoint = lambda br: (1.0 / br[0]) ** (1.0 / br[1])
  below = [br for br in options if midpoint(br) <= threshold]
  return max(below, key=midpoint) if below else min(options, key=midpoint)


class NearDuplicateIndex:
  """LSH over MinHash signatures; a candidate is confirmed when its estimated Jaccard
  similarity (fraction of equal signature entries) reaches the threshold."""

  def __init__(self, num_perm: int, threshold: float):
    self.threshold = threshold
    self.bands, self.rows = lsh_shape(num_perm, threshold)
    self.buckets: list[dict[bytes, int]] = [{} for _ in range(self.bands)]
    self.signatures: list[np.ndarray] = []

  def _keys(self, signature: np.ndarray):
    for band in range(self.bands):
      yield band, signature[band * self.rows:(band + 1) * self.rows].tobytes()

  def add_if_new(self, signature: np.ndarray) -> bool:
    """Index `signature` and return True, unless a near duplicate is already indexed."""
    seen = set()
    for band, key in self._keys(signature):
      other = self.buckets[band].get(key)
      if other is None or other in seen:
        continue
      seen.add(other)
      if np.mean(self.signatures[other] == signature) >= self.threshold:
        return False
    doc = len(self.signatures)
    self.signatures.append(signature)
    for band, key in self._keys(signature):
      self.buckets[band].setdefault(key, doc)
    return True
