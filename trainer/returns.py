"""Per-token regression targets for value training (pure functions).

Convention, the scorer's: a response y_0..y_{T-1} gets one value per token, v_i = the value
model's output at token y_i = V(prompt + y_0..y_i), the value of the partial response ending
with y_i (what the search ranks). The only reward is the final one, R, earned with the last token:

    Monte-Carlo return  G_i = gamma^(T-1-i) * R          (gamma = 1: every token's target is R)
    GAE(lambda) target  G_i = v_i + A_i,   A_i = delta_i + gamma * lam * A_{i+1},
                        delta_i = r_i + gamma * v_{i+1} - v_i,   r_i = R at i = T-1 else 0,  v_T = 0

lam = 1 gives the Monte-Carlo return back, lam = 0 the one-step TD target r_i + gamma * v_{i+1}.
The batched versions also handle responses cut to a window of `kept` < T tokens: Monte-Carlo
targets still come from the full length, and GAE bootstraps at the cut with the Monte-Carlo
return there (the value after the cut is not observed).

    >>> mc_returns(1.0, 3), mc_returns(1.0, 3, gamma=0.5)
    ([1.0, 1.0, 1.0], [0.25, 0.5, 1.0])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mc_returns(reward: float, length: int, gamma: float = 1.0) -> list[float]:
    """Monte-Carlo return of a final `reward` at each of `length` response tokens.

    >>> mc_returns(2.0, 2, gamma=0.9)
    [1.8, 2.0]
    """
    return [float(reward) * gamma ** (length - 1 - i) for i in range(length)]


def gae_targets(reward: float, values: Sequence[float], gamma: float = 1.0, lam: float = 0.95) -> list[float]:
    """GAE(lambda) targets (advantage + value) of one complete response with per-token `values`.

    >>> gae_targets(1.0, [0.0, 0.0, 0.0], lam=1.0)
    [1.0, 1.0, 1.0]
    >>> gae_targets(1.0, [0.5, 0.5, 0.5], lam=0.0)  # TD(0): r_i + v_{i+1}
    [0.5, 0.5, 1.0]
    """
    T = len(values)
    targets = [0.0] * T
    advantage = 0.0
    for i in reversed(range(T)):
        r = float(reward) if i == T - 1 else 0.0
        next_value = values[i + 1] if i + 1 < T else 0.0
        advantage = r + gamma * next_value - values[i] + gamma * lam * advantage
        targets[i] = advantage + values[i]
    return targets


def mc_returns_batch(rewards: torch.Tensor, lengths: torch.Tensor, width: int, gamma: float = 1.0) -> torch.Tensor:
    """(B, width) Monte-Carlo returns; row b covers response tokens 0..width-1 of a response with
    `lengths[b]` tokens (zeros past the end). `width` may be shorter than a response.

    >>> mc_returns_batch(torch.tensor([1.0, -2.0]), torch.tensor([2, 3]), 3, gamma=0.5).tolist()
    [[0.5, 1.0, 0.0], [-0.5, -1.0, -2.0]]
    """
    idx = torch.arange(width, device=lengths.device)  # (W,)
    steps_left = (lengths[:, None] - 1 - idx[None, :]).clamp(min=0)  # (B, W)
    returns = rewards[:, None].float() * torch.pow(torch.tensor(float(gamma)), steps_left.float())
    return torch.where(idx[None, :] < lengths[:, None], returns, torch.zeros_like(returns))


def gae_targets_batch(rewards: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, kept: torch.Tensor | None = None,
                      gamma: float = 1.0, lam: float = 0.95) -> torch.Tensor:
    """(B, W) GAE(lambda) targets from per-token `values` (B, W) of responses with `lengths[b]`
    tokens of which the first `kept[b]` (default: min(length, W)) are in the window.

    >>> v = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    >>> gae_targets_batch(torch.tensor([1.0]), v, torch.tensor([3]), lam=0.0).tolist()
    [[0.5, 0.5, 1.0, 0.0]]
    """
    B, W = values.shape
    if kept is None:
        kept = lengths.clamp(max=W)
    values = values.detach().float()
    idx = torch.arange(W, device=values.device)
    mask = idx[None, :] < kept[:, None]  # (B, W)
    finished = kept >= lengths  # the final token (and its reward) is inside the window
    bootstrap = torch.where(finished, torch.zeros_like(rewards, dtype=torch.float),
                            rewards.float() * torch.pow(torch.tensor(float(gamma)), (lengths - 1 - kept).clamp(min=0).float()))
    v_ext = torch.cat([values * mask, values.new_zeros(B, 1)], dim=1)  # (B, W+1), v_ext[b, kept_b] = value after the cut
    v_ext.scatter_(1, kept[:, None].long(), bootstrap[:, None])
    r = torch.zeros(B, W, dtype=torch.float, device=values.device)
    last = (lengths - 1).clamp(min=0, max=W - 1)
    r.scatter_(1, last[:, None].long(), torch.where(finished, rewards.float(), torch.zeros_like(rewards, dtype=torch.float))[:, None])
    delta = r + gamma * v_ext[:, 1:] - v_ext[:, :-1]  # (B, W)
    advantages = torch.zeros_like(delta)
    running = torch.zeros(B, dtype=torch.float, device=values.device)
    for t in reversed(range(W)):
        running = (delta[:, t] + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return (advantages + v_ext[:, :-1]) * mask


__all__ = ["gae_targets", "gae_targets_batch", "mc_returns", "mc_returns_batch"]
