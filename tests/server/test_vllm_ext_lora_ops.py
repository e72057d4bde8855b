"""The grouped CPU LoRA ops against vLLM's own torch ops, and their one deliberate difference."""

import pytest
import torch

from server.vllm_ext import lora_ops as lora_cpu


class _VllmTorchOps:
    """vLLM's torch LoRA ops, imported at first use: collecting this file costs no vLLM import."""

    def __getattr__(self, name):
        return getattr(pytest.importorskip("vllm.lora.ops.torch_ops"), name)


ops = _VllmTorchOps()

T, IN, R, OUT, SLOTS = 7, 12, 4, 10, 3
BF16 = dict(rtol=2e-2, atol=2e-2)  # the grouped ops multiply in the weights' dtype (bf16), vLLM's in float32


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(T, IN, generator=g, dtype=torch.bfloat16),
                a=torch.randn(SLOTS, 1, R, IN, generator=g, dtype=torch.bfloat16),
                b=torch.randn(SLOTS, 1, OUT, R, generator=g, dtype=torch.bfloat16),
                h=torch.randn(T, R, generator=g),
                y=torch.randn(T, OUT + 6, generator=g))


INDICES = [[1] * T, [0, 2, 2, 1, 0, 0, 2], [2, 0, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("indices", INDICES)
def test_shrink_matches_vllm(data, indices):
    idx = torch.tensor(indices)
    mine, theirs = torch.full((T, R), 9.0), torch.full((T, R), 9.0)
    lora_cpu.bgmv_shrink(data["x"], data["a"], mine, idx, 0.5)
    ops.bgmv_shrink(data["x"], data["a"], theirs, idx, 0.5)
    torch.testing.assert_close(mine, theirs, **BF16)


@pytest.mark.parametrize("indices", INDICES)
@pytest.mark.parametrize("add", [True, False])
def test_expand_and_slice_match_vllm(data, indices, add):
    idx = torch.tensor(indices)
    mine, theirs = data["y"].clone(), data["y"].clone()
    lora_cpu.bgmv_expand(data["h"], data["b"], mine, idx, add)
    ops.bgmv_expand(data["h"], data["b"], theirs, idx, add)
    torch.testing.assert_close(mine, theirs, **BF16)
    mine, theirs = data["y"].clone(), data["y"].clone()
    lora_cpu.bgmv_expand_slice(data["h"], data["b"], mine, idx, 3, OUT, add)
    ops.bgmv_expand_slice(data["h"], data["b"], theirs, idx, 3, OUT, add)
    torch.testing.assert_close(mine, theirs, **BF16)


def test_prefill_ops_expand_one_index_per_sequence(data):
    seq_lens, seq_idx = torch.tensor([3, 4]), torch.tensor([2, 0])
    mine, theirs = torch.zeros(T, R), torch.zeros(T, R)
    lora_cpu.sgmv_shrink(data["x"], data["a"], mine, None, seq_lens, seq_idx, 2, 4, T, 1.0)
    ops.sgmv_shrink(data["x"], data["a"], theirs, torch.tensor([0, 3]), seq_lens, seq_idx, 2, 4, T, 1.0)
    torch.testing.assert_close(mine, theirs, **BF16)
    mine_y, theirs_y = data["y"].clone(), data["y"].clone()
    lora_cpu.sgmv_expand_slice(mine, data["b"], mine_y, None, seq_lens, seq_idx, 2, 4, T, 2, OUT, True)
    ops.sgmv_expand_slice(theirs, data["b"], theirs_y, None, seq_lens, seq_idx, 2, 4, T, 2, OUT, True)
    torch.testing.assert_close(mine_y, theirs_y, **BF16)


def test_tokens_without_lora_get_no_contribution(data):
    """-1 means "no LoRA": vLLM's torch ops read the last adapter slot for it (nonzero here)."""
    idx = torch.tensor([0, -1, 0, -1, 1, 1, -1])
    base = idx < 0
    shrunk = torch.full((T, R), 9.0)
    lora_cpu.bgmv_shrink(data["x"], data["a"], shrunk, idx, 1.0)
    assert torch.all(shrunk[base] == 0) and torch.all(shrunk[~base] != 0)
    y = data["y"].clone()
    lora_cpu.bgmv_expand(data["h"], data["b"], y, idx, True)
    assert torch.equal(y[base], data["y"][base]) and not torch.allclose(y[~base], data["y"][~base])
    y = data["y"].clone()
    lora_cpu.bgmv_expand_slice(data["h"], data["b"], y, idx, 3, OUT, False)
    assert torch.all(y[base, 3:3 + OUT] == 0) and torch.equal(y[:, :3], data["y"][:, :3])
    theirs = torch.zeros(T, R)
    ops.bgmv_shrink(data["x"], data["a"], theirs, idx, 1.0)
    assert torch.all(theirs[base] != 0)  # the upstream behaviour this patch corrects


def test_groups_cover_every_token_once():
    idx = torch.tensor([3, -1, 3, 0, -1])
    groups = lora_cpu.lora_groups(idx)
    rows = torch.cat([r for _, r in groups]).sort().values
    assert rows.tolist() == list(range(5)) and {s for s, _ in groups} == {-1, 0, 3}
    assert lora_cpu.lora_groups(torch.tensor([], dtype=torch.long)) == []


def test_an_all_zero_slot_is_skipped_until_vllm_writes_it(data):
    """vLLM wraps every linear layer: an adapter on q/k/v/o leaves the MLP layers' slots zero."""
    a, b = data["a"].clone(), data["b"].clone()
    a[1].zero_()
    b[1].zero_()
    idx = torch.ones(T, dtype=torch.long)
    shrunk = torch.full((T, R), 9.0)
    lora_cpu.bgmv_shrink(data["x"], a, shrunk, idx, 1.0)
    assert torch.all(shrunk == 0)
    y = data["y"].clone()
    lora_cpu.bgmv_expand_slice(data["h"], b, y, idx, 0, OUT, True)
    assert torch.equal(y, data["y"])
    b[1, 0, :, :].copy_(data["b"][1, 0])  # an adapter is loaded into the slot: the version counter moves
    lora_cpu.bgmv_expand_slice(data["h"], b, y, idx, 0, OUT, True)
    theirs = data["y"].clone()
    ops.bgmv_expand_slice(data["h"], data["b"], theirs, idx, 0, OUT, True)
    torch.testing.assert_close(y, theirs, **BF16)


# --- the compiled path: the punica wrapper's methods as custom ops --------------------------------

class _Wrapper:
    """What the ops read of vLLM's punica wrapper: the step's per-token adapter slots."""

    def __init__(self, indices):
        self.token_lora_indices = torch.tensor(indices)


@pytest.fixture
def step():
    def set_step(indices):
        lora_cpu._ACTIVE[0] = _Wrapper(indices)
    yield set_step
    lora_cpu._ACTIVE[0] = None


def _slices(seed=1, slices=(10, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(SLOTS, 1, R, IN, generator=g, dtype=torch.bfloat16) for _ in slices]
    b = [torch.randn(SLOTS, 1, o, R, generator=g, dtype=torch.bfloat16) for o in slices]
    return a, b, list(slices)


def _reference_linear(y, x, a, b, scale, slices, indices):
    """vLLM's own torch ops, slice by slice (their -1 reads the last slot: callers avoid -1 here)."""
    idx, offset = torch.tensor(indices), 0
    for ai, bi, width in zip(a, b, slices):
        h = torch.zeros(x.shape[0], R)
        ops.bgmv_shrink(x, ai, h, idx, scale)
        ops.bgmv_expand_slice(h, bi, y, idx, offset, width, True)
        offset += width


@pytest.mark.parametrize("indices", INDICES)
def test_lora_linear_op_matches_vllm_slice_by_slice(data, step, indices):
    a, b, slices = _slices()
    step(indices)
    mine, theirs = torch.zeros(T, sum(slices)), torch.zeros(T, sum(slices))
    torch.ops.iro.lora_linear(mine, data["x"], a, b, 0.5, slices)
    _reference_linear(theirs, data["x"], a, b, 0.5, slices, indices)
    torch.testing.assert_close(mine, theirs, **BF16)
    assert mine.abs().sum() > 0


def test_lora_linear_op_leaves_tokens_without_lora_and_zero_slots_alone(data, step):
    a, b, slices = _slices()
    for t in (*a, *b):
        t[2].zero_()  # slot 2: an adapter that does not touch this layer
    step([0, -1, 2, 0, -1, 2, 1])
    y0 = torch.randn(T, sum(slices))
    y = y0.clone()
    torch.ops.iro.lora_linear(y, data["x"], a, b, 1.0, slices)
    untouched = torch.tensor([False, True, True, False, True, True, False])
    assert torch.equal(y[untouched], y0[untouched]) and not torch.allclose(y[~untouched], y0[~untouched])
    for t, fresh in zip((*a, *b), (*_slices()[0], *_slices()[1])):
        t[2].copy_(fresh[2])  # vLLM loads an adapter into slot 2: the cached fused weights are rebuilt
    y = y0.clone()
    torch.ops.iro.lora_linear(y, data["x"], a, b, 1.0, slices)
    assert not torch.allclose(y[2], y0[2])


def test_shrink_expand_and_embedding_ops_match_vllm(data, step):
    indices = [0, 2, 2, 1, 0, 0, 2]
    step(indices)
    idx = torch.tensor(indices)
    a, b, slices = _slices()
    mine = torch.zeros(len(a), T, R)
    torch.ops.iro.lora_shrink(mine, data["x"], a, 0.5)
    for i, ai in enumerate(a):
        theirs = torch.zeros(T, R)
        ops.bgmv_shrink(data["x"], ai, theirs, idx, 0.5)
        torch.testing.assert_close(mine[i], theirs, **BF16)
    y_mine, y_theirs = torch.zeros(T, sum(slices) + 2), torch.zeros(T, sum(slices) + 2)
    torch.ops.iro.lora_expand(y_mine, list(mine), b, slices, 2, True)
    offset = 2
    for hi, bi, width in zip(mine, b, slices):
        ops.bgmv_expand_slice(hi, bi, y_theirs, idx, offset, width, True)
        offset += width
    torch.testing.assert_close(y_mine, y_theirs, **BF16)
    y_mine, y_theirs = data["y"].clone(), data["y"].clone()
    torch.ops.iro.lora_embedding(y_mine, data["h"], data["b"], True)
    ops.bgmv_expand(data["h"], data["b"], y_theirs, idx, True)
    torch.testing.assert_close(y_mine, y_theirs, **BF16)


@pytest.mark.slow  # torch.compile: seconds
def test_a_compiled_model_reads_each_steps_adapters_at_run_time(data, step):
    """Why the ops exist: a model traced once must not freeze the first step's adapter choice."""
    a, b, slices = _slices()

    def layer(x):
        y = torch.zeros(x.shape[0], sum(slices))
        torch.ops.iro.lora_linear(y, x, a, b, 1.0, slices)
        return y * 2

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    outputs = []
    for indices in ([1] * T, [-1] * T, [0, 2, 2, 1, 0, 0, 2], [2, 0, 0, 0, 0, 0, 0]):
        step(indices)
        outputs.append(compiled(data["x"]))
        torch.testing.assert_close(outputs[-1], layer(data["x"]), rtol=0, atol=0)  # eager: the same op
    assert torch.all(outputs[1] == 0) and all(not torch.allclose(o, outputs[0]) for o in outputs[2:])


def test_the_weight_caches_forget_a_stack_when_it_is_freed():
    """They are keyed by id(tensor); a freed tensor's id may be reused by a new stack."""
    import gc

    stack = torch.zeros(2, 1, 4, 8)
    stack[1] = 1.0
    assert lora_cpu._weights(stack, 0) is None and lora_cpu._weights(stack, 1) is not None
    key = id(stack)
    assert key in lora_cpu._ZERO_SLOTS
    del stack
    gc.collect()
    assert key not in lora_cpu._ZERO_SLOTS
