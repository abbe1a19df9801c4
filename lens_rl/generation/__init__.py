"""Generation backends: HF (``generate`` / the decoder's nondiff generator) and vLLM."""
