"""Model definitions in `tvm.relax.frontend.nn`, built on TVM's paged KV cache."""
