"""Inference: the continuous-batching engine, its KV cache, streaming text and precision."""
