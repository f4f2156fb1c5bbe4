"""Custom GPU kernels and the autograd functions around them (Triton), kept apart from `packing` so a
process can build them without importing transformers (`kernels.prebuild`)."""
