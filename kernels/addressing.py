"""The numbers a kernel needs to find a token's bytes — nothing about pools or requests.

For location ``loc`` of layer ``l`` (``l`` indexes ``row_base``/``col_base``)::

    page, t = loc // tpp, loc % tpp
    row     = row_base[l] + page * row_step
    value   = buf[row, col_base[l] + t*V           : ... + V]
    scale   = buf[row, col_base[l] + tpp*V + t*S   : ... + scale_bytes]    (only when S > 0)

A location is *valid* when ``0 <= loc < num_pages * tpp``.  Invalid locations (-1 padding, or
anything out of range) are never read or written: gathers return zeros for them, scatters skip
them.  Nothing is ever clipped or wrapped onto another token's bytes.
"""
from __future__ import annotations

from typing import NamedTuple


class TokenAddressing(NamedTuple):
    """Static addressing of one token pool's layers inside one ``uint8[rows, row_bytes]`` buffer.

    Attributes:
      row_base: per layer, the buffer row of page 0.
      col_base: per layer, the byte column where the layer's page starts.
      row_step: rows between consecutive pages (1 in both layouts).
      tpp: tokens per page.
      num_pages: pages per layer (bounds the valid locations).
      value_bytes: V, value bytes per token.
      scale_stride: S, bytes of one token's scale slot (0: no scale part).
      scale_bytes: bytes of the scale slot that are read/written (<= S; 7 of 8 for DSv4).
    """

    row_base: tuple[int, ...]
    col_base: tuple[int, ...]
    row_step: int
    tpp: int
    num_pages: int
    value_bytes: int
    scale_stride: int
    scale_bytes: int

    @property
    def num_layers(self) -> int:
        return len(self.row_base)

    @property
    def capacity(self) -> int:
        return self.num_pages * self.tpp

    def select(self, layers: tuple[int, ...]) -> "TokenAddressing":
        """The same addressing restricted to some layers (in the given order)."""
        return self._replace(row_base=tuple(self.row_base[i] for i in layers),
                             col_base=tuple(self.col_base[i] for i in layers))


class PageAddressing(NamedTuple):
    """Static addressing of whole pages: page ``p`` of layer ``l`` is
    ``buf[row_base[l] + p*row_step, col_base[l] : col_base[l] + page_bytes]``."""

    row_base: tuple[int, ...]
    col_base: tuple[int, ...]
    row_step: int
    num_pages: int
    page_bytes: int

    @property
    def num_layers(self) -> int:
        return len(self.row_base)
