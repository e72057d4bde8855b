"""The former home of the vLLM patches, now `server.vllm_ext`. Kept only because an editable
install made before the move names `server.engine_patches:install_worker_patches` as its
`vllm.general_plugins` entry point (a fresh install names `server.vllm_ext`)."""

from server.vllm_ext import install_worker_patches

register = install_worker_patches

__all__ = ["install_worker_patches"]
