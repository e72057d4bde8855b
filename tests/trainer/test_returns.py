"""Per-token targets: Monte-Carlo returns and GAE(lambda), list and batched forms agree."""

from __future__ import annotations

import random

import pytest
import torch

from trainer.returns import gae_targets, gae_targets_batch, mc_returns, mc_returns_batch


def test_gamma_one_gives_every_token_the_final_reward():
    assert mc_returns(0.7, 5) == [0.7] * 5
    out = mc_returns_batch(torch.tensor([0.7, -1.0]), torch.tensor([5, 2]), 6)
    assert out.tolist() == [[pytest.approx(0.7)] * 5 + [0.0], [-1.0, -1.0, 0.0, 0.0, 0.0, 0.0]]


def test_discounting_counts_tokens_left_and_the_last_token_gets_the_reward():
    assert mc_returns(1.0, 4, gamma=0.9) == pytest.approx([0.729, 0.81, 0.9, 1.0])
    assert mc_returns_batch(torch.tensor([1.0]), torch.tensor([4]), 4, 0.9).tolist()[0] == pytest.approx([0.729, 0.81, 0.9, 1.0])


def test_a_window_shorter_than_the_response_keeps_the_full_length_returns():
    out = mc_returns_batch(torch.tensor([1.0]), torch.tensor([5]), 3, gamma=0.5)
    assert out.tolist()[0] == pytest.approx([1 / 16, 1 / 8, 1 / 4])


def test_gae_with_lambda_one_is_the_monte_carlo_return_whatever_the_values():
    values = [0.3, -2.0, 5.0, 0.1]
    assert gae_targets(2.0, values, gamma=0.9, lam=1.0) == pytest.approx(mc_returns(2.0, 4, gamma=0.9))


def test_gae_with_lambda_zero_is_the_one_step_td_target():
    values = [0.3, -2.0, 5.0]
    assert gae_targets(2.0, values, gamma=1.0, lam=0.0) == pytest.approx([-2.0, 5.0, 2.0])


def test_batched_gae_matches_the_reference_loop_with_padding_and_truncation():
    rng = random.Random(0)
    lengths = [5, 1, 7, 3]
    W = 6  # the 7-token response is cut to 6
    values = torch.tensor([[rng.uniform(-1, 1) for _ in range(W)] for _ in lengths])
    rewards = torch.tensor([0.5, -1.0, 2.0, 1.5])
    out = gae_targets_batch(rewards, values, torch.tensor(lengths), gamma=0.95, lam=0.9)
    for b, T in enumerate(lengths):
        if T <= W:
            expected = gae_targets(rewards[b].item(), values[b, :T].tolist(), gamma=0.95, lam=0.9)
            assert out[b, :T].tolist() == pytest.approx(expected, abs=1e-6)
            assert out[b, T:].abs().sum() == 0
    # the cut row: bootstrap with the Monte-Carlo return after the cut == the full response's GAE
    # when the unseen value equals that return
    full_values = values[2].tolist() + [mc_returns(2.0, 7, 0.95)[6]]
    expected = gae_targets(2.0, full_values, gamma=0.95, lam=0.9)[:W]
    assert out[2].tolist() == pytest.approx(expected, abs=1e-6)
