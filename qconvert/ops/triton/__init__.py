"""The Triton kernel family (CUDA, or the CPU under TRITON_INTERPRET=1 for tests): the ``@triton.jit``
code in ``kernels_*.py``, its launch and validation in :mod:`.launch`, the op-level kernels and their
table (``KERNELS``) in :mod:`.kernels`. Importing this package imports no Triton."""
