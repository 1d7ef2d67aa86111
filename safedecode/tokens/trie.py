"""The token trie, laid out in depth-first (sorted-bytes) order.

Tokens are ranked by their bytes, so every trie subtree holds a *contiguous* range of ranks: "all
tokens under this node" is one ``[lo, hi)`` range (the idea behind llguidance's toktrie). Nodes are
numbered in pre-order, so "skip this subtree" is a jump to ``skip[n]``.

Invariants:
  * node 0 is the root (depth 0, no byte); every other node ``n`` has ``depth[n] >= 1`` and its
    parent is the closest preceding node of depth ``depth[n] - 1``;
  * tokens ending exactly at ``n`` have ranks ``[tok_lo[n], tok_hi[n])`` and sort before the
    tokens below ``n``; the whole subtree's ranks are ``[tok_lo[n], sub_hi[n])``;
  * duplicate byte strings (distinct ids, same bytes) end at the same node with consecutive ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np


@dataclass(frozen=True)
class TokenTrie:
    byte: np.ndarray      # uint8 [n_nodes]
    depth: np.ndarray     # int32 [n_nodes]
    tok_lo: np.ndarray    # int32 [n_nodes]
    tok_hi: np.ndarray    # int32 [n_nodes]
    sub_hi: np.ndarray    # int32 [n_nodes]
    skip: np.ndarray      # int32 [n_nodes]
    rank_to_id: np.ndarray  # int32 [n_ranks]
    max_depth: int

    @property
    def n_nodes(self) -> int:
        return len(self.byte)


@numba.njit(cache=True)
def _build(flat, offsets):
    n_tokens = len(offsets) - 1
    cap = len(flat) + 1
    byte = np.zeros(cap, np.uint8)
    depth = np.zeros(cap, np.int32)
    tok_lo = np.zeros(cap, np.int32)
    tok_hi = np.zeros(cap, np.int32)
    sub_hi = np.zeros(cap, np.int32)
    skip = np.zeros(cap, np.int32)
    max_len = 0
    for r in range(n_tokens):
        max_len = max(max_len, offsets[r + 1] - offsets[r])
    path = np.zeros(max_len + 1, np.int32)  # node at each depth along the current token
    path_len = 0
    n_nodes = 1
    prev_start, prev_end = 0, 0
    for r in range(n_tokens):
        start, end = offsets[r], offsets[r + 1]
        length = end - start
        common = 0
        limit = min(length, prev_end - prev_start)
        while common < limit and flat[start + common] == flat[prev_start + common]:
            common += 1
        while path_len > common:  # close the nodes the new token leaves
            node = path[path_len]
            sub_hi[node] = r
            skip[node] = n_nodes
            path_len -= 1
        while path_len < length:
            node = n_nodes
            n_nodes += 1
            path_len += 1
            byte[node] = flat[start + path_len - 1]
            depth[node] = path_len
            tok_lo[node] = r
            tok_hi[node] = r
            path[path_len] = node
        tok_hi[path[length]] = r + 1
        prev_start, prev_end = start, end
    while path_len > 0:
        node = path[path_len]
        sub_hi[node] = n_tokens
        skip[node] = n_nodes
        path_len -= 1
    sub_hi[0] = n_tokens
    skip[0] = n_nodes
    return (byte[:n_nodes], depth[:n_nodes], tok_lo[:n_nodes], tok_hi[:n_nodes], sub_hi[:n_nodes],
            skip[:n_nodes], max_len)


def build_trie(token_bytes) -> TokenTrie:
    """Trie of every token id with non-empty bytes (``None`` / ``b""`` entries are left out)."""
    items = sorted((data, token_id) for token_id, data in enumerate(token_bytes) if data)
    rank_to_id = np.array([token_id for _, token_id in items], dtype=np.int32)
    flat = np.frombuffer(b"".join(data for data, _ in items), dtype=np.uint8)
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum([len(data) for data, _ in items], out=offsets[1:])
    byte, depth, tok_lo, tok_hi, sub_hi, skip, max_len = _build(flat, offsets)
    return TokenTrie(byte, depth, tok_lo, tok_hi, sub_hi, skip, rank_to_id, int(max_len))
