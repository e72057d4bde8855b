"""iro-serve: serve a frozen LLM with vLLM and align it at test time with value functions."""

__version__ = "0.1.0"
