"""`iro bench --adapter`: the adapter it serves is a valid policy for the default model; the table
renders and the target is judged from the figures (timings themselves are not tested)."""

import pytest

from bench.adapter import POLICY, TARGETS, machine, print_table, publish_random_adapter
from bench.guided import evaluate_targets_of


@pytest.mark.slow
def test_the_bench_adapter_is_a_policy_the_server_accepts(tmp_path):
    from common.model_store import prepare_default_model
    from valuefn.model import backbone_identity
    from registry.policies import PolicyRegistry, check_adapter, check_base

    model_path = prepare_default_model()
    version = publish_random_adapter(tmp_path, model_path, rank=4)
    registry = PolicyRegistry(tmp_path)
    manifest = registry.verify(POLICY, version)
    check_base(manifest, backbone_identity(model_path))
    weights = check_adapter(registry.path(POLICY, version), manifest)
    assert manifest.lora_rank == 4 and any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)


def test_adapter_target_and_table():
    figures = {"adapter_vs_plain_time_ratio": 1.1, "adapter_vs_plain_per_token_ratio": 1.1,
               "adapter_vs_plain_no_registry_time_ratio": 1.4, "plain_with_registry_vs_without": 1.2,
               "plain_tok_per_s_no_registry": 900.0, "plain_tok_per_s_with_registry": 750.0,
               "adapter_tok_per_s": 700.0, "engine_start_seconds_no_registry": 60.0,
               "engine_start_seconds_with_registry": 40.0}
    figures["targets"] = evaluate_targets_of(figures, TARGETS)
    assert figures["targets"]["adapter_vs_plain_time_ratio"]["met"]
    assert not evaluate_targets_of({"adapter_vs_plain_time_ratio": 1.31}, TARGETS)["adapter_vs_plain_time_ratio"]["met"]
    print_table(figures)
    assert machine()["cpus"] >= 1
