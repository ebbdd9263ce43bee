"""The torch side of jaxkv (installed as ``jaxkv.interop``).

* ``to_torch`` / ``from_torch`` / ``to_torch_shards``: zero-copy DLPack exchange (or a clear
  error), with the ownership rules of ``dlpack`` (``donate_safe``, ``jit_donating``).
* ``DSV4TorchPool``: a torch-owned DeepSeek-V4 cache with SGLang's layout and method names, running
  jaxkv's Triton kernels directly on torch tensors.
* ``vllm_layer_views``: vLLM-style per-layer torch views of a JAX-owned (packed) cache.

``jaxkv.interop.transfer`` (NIXL registration) is optional and not imported here.
"""
from jaxkv.interop.dlpack import (OwnershipError, buffer_pointer, donate_safe, from_torch,
                                  is_torch_owned, is_viewed_by_torch, jit_donating, to_torch,
                                  to_torch_shards, torch_views)
from jaxkv.interop.torch_pool import DSV4CpuCopy, DSV4TorchPool, vllm_layer_views

DeepSeekV4TokenToKVPool = DSV4TorchPool  # SGLang's class name

__all__ = [
    "DSV4CpuCopy", "DSV4TorchPool", "DeepSeekV4TokenToKVPool", "OwnershipError",
    "buffer_pointer", "donate_safe", "from_torch", "is_torch_owned", "is_viewed_by_torch",
    "jit_donating", "to_torch", "to_torch_shards", "torch_views", "vllm_layer_views",
]
