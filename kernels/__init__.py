"""Device kernels of jaxkv (installed as ``jaxkv.kernels``).

Kernels know only buffers (``uint8[rows, row_bytes]``), static addressing
(``TokenAddressing`` / ``PageAddressing``) and int32 indices — nothing of pools or requests.

Each op has a pure-jnp reference (``reference``, the oracle), a Pallas version (``pallas_ops``,
interpret mode on CPU) and plain Triton kernels (``triton_kernels``: callable on torch tensors;
``triton_jax``: the same kernels on JAX arrays through jax-triton, GPU only).  ``dispatch`` runs
an op by implementation name, or ``"auto"`` (Triton on GPU, the reference on CPU).
"""
from jaxkv.kernels.addressing import PageAddressing, TokenAddressing
from jaxkv.kernels import reference

__all__ = ["PageAddressing", "TokenAddressing", "reference"]
