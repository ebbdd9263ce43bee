"""Device kernels of jaxkv (installed as ``jaxkv.kernels``).

Kernels know only buffers (``uint8[rows, row_bytes]``), static addressing
(``TokenAddressing`` / ``PageAddressing``) and int32 indices — nothing of pools or requests.

Each op has a pure-jnp reference (``reference``), and may have Pallas and Triton implementations;
``dispatch.pick`` chooses one by name or ``"auto"``.
"""
from jaxkv.kernels.addressing import PageAddressing, TokenAddressing
from jaxkv.kernels import reference

__all__ = ["PageAddressing", "TokenAddressing", "reference"]
