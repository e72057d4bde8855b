"""iro-serve: serve a frozen LLM with vLLM and align it at test time with value functions."""

from common.version import __version__

__all__ = ["__version__"]
