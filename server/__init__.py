"""The OpenAI-compatible HTTP server: vLLM engine for the frozen base model + value-guided search."""
