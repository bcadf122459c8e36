"""Kernels and numerics: the selective scan (reference, chunked, C++ and Triton backends, one dispatch point),
the fused ops they run (``library.py``: one declaration each, a kernel per device), the oneDNN route for CPU
matrix products, and process-memory settings. Imports nothing else of the package."""
