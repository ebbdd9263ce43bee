"""Pool sizes from a memory budget: SGLang's formula and ours (SPEC §3, issue #40337).

SGLang sizes a DSv4 cache by ``jaxkv.geometry.sglang_bytes_per_full_token(geo, r)``: every full
token costs its compressed-pool bytes plus ``r`` SWA tokens (every layer and the MTP draft layer),
and each SWA token carries compress-state rows sized *by the window* (``ring`` rows per 128 SWA
tokens).  Two things are wasted:

* the C4 (and C4-indexer) state is addressed *by the page* — ``(s // 256) * 8 + s % 8`` uses 8
  rows per 256-token SWA page — but allocated as 8 rows per 128 tokens: half of it is never
  touched (a 2x over-allocation, SGLang issue #40337);
* the C128 state is page-scoped: 128 rows (4 KiB each) per SWA page and layer, 8,192 of Flash's
  ~15,956 B per full token at r = 0.1.  Only a running request needs it, so we size it
  *request-scoped* (``max_requests * 128`` rows, ``jaxkv.locs.request_state_rows``), newer
  SGLang's addressing.

Ours keeps the model behaviour identical: the same ``r`` (SWA tokens per full token), the same
page-scoped C4 state addressing, exact page bytes (FlashMLA padding included), and the MTP
layer's SWA pages counted in the budget (the layer-major layout does not hold them; the draft
model's cache does).  ``capacity`` returns both numbers and the page counts for
``jaxkv.layer_major(geo, cap.pages)``.
"""
from __future__ import annotations

import dataclasses
import math

from jaxkv.geometry import Geometry, sglang_bytes_per_full_token

__all__ = ["Capacity", "capacity", "pool_pages", "pool_bytes", "report"]


@dataclasses.dataclass(frozen=True)
class Capacity:
    """Token capacity of a budget, SGLang's formula vs ours.

    Attributes:
      geometry: geometry name.
      budget: bytes.
      swa_ratio: r, SWA tokens per full token.
      max_requests: request slots (request-scoped C128 state).
      c128_scope: ``"request"`` or ``"page"``.
      sglang_bytes_per_token: SGLang's formula.
      sglang_tokens: ``floor(budget / sglang_bytes_per_token)``.
      ours_tokens: full tokens the layer-major pools hold (``(pages - 1) * page_size``).
      ours_bytes: bytes used by our pools (+ MTP SWA pages), ``<= budget``.
      ours_bytes_per_token: ``ours_bytes / ours_tokens`` (fixed costs included).
      pages: page (token pools) / row (state pools, sentinel included) counts per pool, for
        ``jaxkv.layer_major(geo, pages)``.
      swa_requests: requests the SWA pool can hold at once (``(swa pages - 1) // ring``).
    """

    geometry: str
    budget: int
    swa_ratio: float
    max_requests: int
    c128_scope: str
    sglang_bytes_per_token: float
    sglang_tokens: int
    ours_tokens: int
    ours_bytes: int
    ours_bytes_per_token: float
    pages: dict
    swa_requests: int

    @property
    def ratio(self) -> float:
        """``ours_tokens / sglang_tokens``."""
        return self.ours_tokens / self.sglang_tokens


def pool_pages(geo: Geometry, full_pages: int, swa_ratio: float, max_requests: int,
               c128_scope: str = "request") -> dict:
    """Page / row counts of every pool for ``full_pages`` full pages (page 0 included).

    * c4, c128, c4_indexer: ``full_pages`` (their pages line up 1:1 with full pages).
    * swa: ``ceil(r * (full_pages - 1)) + 1`` pages (page 0 reserved) of ``page_size`` tokens.
    * c4_state, c4_indexer_state: ``(swa - 1) * c4_ring + 1`` rows — the page-scoped addressing
      ``(s // page) * ring + s % ring`` of the usable SWA pages (page 0's ring rows are the dummy
      target; the +1 is the sentinel).  Precisely: ``swa * c4_ring + 1``.
    * c128_state: ``max_requests * c128_ring + 1`` (request-scoped) or ``swa * c128_ring + 1``.
    """
    if not geo.is_dsv4:
        raise ValueError("pool_pages is defined for DSv4 geometries")
    if c128_scope not in ("request", "page"):
        raise ValueError(f"c128_scope must be 'request' or 'page', got {c128_scope!r}")
    if not 0 < swa_ratio <= 1:
        raise ValueError(f"swa_ratio must be in (0, 1], got {swa_ratio}")
    nf = int(full_pages)
    ns = math.ceil(swa_ratio * (nf - 1)) + 1
    c128 = (max_requests if c128_scope == "request" else ns) * geo.c128_ring + 1
    return {"swa": ns, "c4": nf, "c128": nf, "c4_indexer": nf,
            "c4_state": ns * geo.c4_ring + 1, "c4_indexer_state": ns * geo.c4_ring + 1,
            "c128_state": c128}


def pool_bytes(geo: Geometry, pages: dict) -> int:
    """Bytes of ``jaxkv.layer_major(geo, pages)`` plus the MTP layers' SWA pages."""
    total = 0
    for spec in geo.pools():
        n = pages[spec.name]
        if spec.kind == "token":
            tpp = geo.page_size // spec.ratio
            pb = spec.fmt.page_bytes(tpp, None)
        else:
            pb = spec.fmt.token_bytes
        total += spec.num_layers * n * pb
    swa_pb = geo.mla.page_bytes(geo.page_size, None)
    return total + geo.mtp_layers * pages["swa"] * swa_pb


def capacity(geo: Geometry, budget: int, swa_ratio: float, max_requests: int,
             c128_scope: str = "request") -> Capacity:
    """Full tokens a ``budget`` (bytes) holds: SGLang's formula vs our sizing.

    Ours: the largest full page count whose pools (``pool_pages``) fit the budget.

    Raises:
      ValueError: when not even 2 full pages fit.
    """
    if budget <= 0:
        raise ValueError(f"budget must be positive bytes, got {budget}")
    sg = sglang_bytes_per_full_token(geo, swa_ratio)

    def cost(nf):
        return pool_bytes(geo, pool_pages(geo, nf, swa_ratio, max_requests, c128_scope))

    if cost(2) > budget:
        raise ValueError(f"budget {budget} B does not hold 2 full pages ({cost(2)} B)")
    lo, hi = 2, 2
    while cost(hi) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # cost is monotone in nf
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    pages = pool_pages(geo, lo, swa_ratio, max_requests, c128_scope)
    used = cost(lo)
    tokens = (lo - 1) * geo.page_size
    ring = 2 if geo.swa_window <= geo.page_size else (geo.swa_window - 1) // geo.page_size + 2
    return Capacity(geo.name, int(budget), swa_ratio, max_requests, c128_scope, sg,
                    int(budget // sg), tokens, used, used / tokens, pages,
                    (pages["swa"] - 1) // ring)


def report(budget: float = 60e9, swa_ratios=(0.1,), max_requests=(256, 1024),
           scopes=("request", "page")) -> str:
    """A markdown table of ``capacity`` for DSv4-Flash and Pro (the demo prints it)."""
    from jaxkv.geometry import dsv4_flash, dsv4_pro
    lines = [f"Full-token capacity in {budget / 1e9:g} GB (SGLang formula vs jaxkv sizing)", "",
             "| model | r | C128 state | max requests | SGLang B/token | SGLang tokens | "
             "ours B/token | ours tokens | ratio | SWA-pool requests |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for geo in (dsv4_flash(), dsv4_pro()):
        for r in swa_ratios:
            for scope in scopes:
                for m in (max_requests if scope == "request" else max_requests[:1]):
                    c = capacity(geo, int(budget), r, m, scope)
                    mm = m if scope == "request" else "-"
                    lines.append(f"| {geo.name} | {r} | {scope} | {mm} | "
                                 f"{c.sglang_bytes_per_token:,.1f} | "
                                 f"{c.sglang_tokens:,} | {c.ours_bytes_per_token:,.1f} | "
                                 f"{c.ours_tokens:,} | {c.ratio:.2f}x | {c.swa_requests:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
