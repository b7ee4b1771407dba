"""The CPU kernel family: :mod:`.kernels` holds the kernels and their table (``KERNELS``), the one
place where the CPU implementation of each op is chosen."""
