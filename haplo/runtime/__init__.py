"""The runtime: one backend interface, autoregressive decoding and guided DDIM over any backend."""
