"""Hand-written GPU kernels (Triton), each with a bitsandbytes/PyTorch fallback."""
