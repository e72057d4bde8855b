"""What the engine's workers report to the API process, through vLLM's worker extension
mechanism (`--worker-extension-cls`, the way RLHF frameworks add worker methods) and
`AsyncLLM.collective_rpc`: each worker says which patches its process installed and what its model
runner computes for value heads, so the API process never re-runs a probe to guess."""

from __future__ import annotations

WORKER_EXTENSION = "server.vllm_ext.worker.IroWorkerExtension"
"""`AsyncEngineArgs.worker_extension_cls` for the server's engine."""
REPORT_METHOD = "iro_engine_report"


class IroWorkerExtension:
    """Mixed into vLLM's worker class by vLLM itself (no attribute may clash with the worker's)."""

    def iro_engine_report(self) -> dict:
        from server.vllm_ext import install_worker_patches
        from server.vllm_ext.value_heads import runner_report

        status = install_worker_patches()  # idempotent: this process's record
        config = self.vllm_config
        report = runner_report(self.model_runner, status)
        report.update(patches=status, rank=getattr(self, "rank", 0),
                      tensor_parallel_size=config.parallel_config.tensor_parallel_size,
                      pipeline_parallel_size=config.parallel_config.pipeline_parallel_size,
                      compilation_mode=int(config.compilation_config.mode),
                      cudagraph_mode=str(getattr(config.compilation_config, "cudagraph_mode", None)))
        return report


def combine(reports: list[dict]) -> dict:
    """One view of every worker's report: heads on only if every worker computes them, the layers
    every worker exposes, each patch's outcome as the first worker that did not install it says."""
    if not reports:
        return {"value_heads": "no worker reported", "value_layers": [], "patches": {}}
    heads = next((r["value_heads"] for r in reports if r["value_heads"] != "installed"), "installed")
    layers = sorted(set.intersection(*(set(r["value_layers"]) for r in reports)))
    patches: dict[str, str] = {}
    for r in reports:
        for name, why in r.get("patches", {}).items():
            if patches.get(name, "installed") == "installed":
                patches[name] = why
    first = reports[0]
    return {**first, "value_heads": heads, "value_layers": layers if heads == "installed" else [],
            "patches": patches, "workers": len(reports)}
