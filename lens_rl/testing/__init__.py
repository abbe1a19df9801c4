"""Helpers that build tiny, offline models for tests, benchmarks and the demo."""

from lens_rl.testing.tiny_models import TINY_ARCHS, build_tiny_model, tiny_config

__all__ = ["TINY_ARCHS", "build_tiny_model", "tiny_config"]
