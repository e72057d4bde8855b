"""Policy-distillation losses: APA and IS-DAAs (IS-DPO, IS-IPO), as pure tensor functions.

APA (Zhu et al., arXiv 2306.02231) regresses the policy's log-ratio to the initial policy onto the
advantage scaled by 1/lambda, token by token: the minimiser is pi* ~ pi_init * exp(A / lambda), the
KL-regularised optimum, so lambda is the one knob of how far the policy moves.

    L_APA = mean_t (log pi(a_t|s_t) - log pi_init(a_t|s_t) - A_t / lambda)^2

IS-DAAs (Nguyen et al., "Mitigating Reward Over-optimization in Direct Alignment Algorithms with
Importance Sampling", arXiv 2506.08681; code github.com/duyhominhnguyen/IS-DAAs) multiply a direct
alignment loss by an importance ratio between the policy and the policy that produced the data,
clipped from above (no gradient through it) to keep its variance bounded:

    w     = exp(min(log pi(y_w|x) - log mu(y_w|x) + log pi(y_l|x) - log mu(y_l|x), 2 * eps))
    h     = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))
    L_DPO = w * -log sigmoid(beta * h)          L_IPO = w * (h - 1 / (2 beta))^2

With `sft_weight` alpha > 0 the chosen answer's per-token negative log-likelihood is added to each
pair's loss, as RPO does (Liu et al., arXiv 2405.16436; Pang et al., arXiv 2404.19733):

    L = L_DAA + alpha * -log pi(y_w|x) / |y_w|

It keeps the chosen answers likely: DPO alone lowers the likelihood of both answers of a pair and
moves the mass to text outside the data, which here narrows the policy (distinct-2) faster than it
gains reward.

mu defaults to the reference policy (the authors' code does the same when the data carries no
behaviour log-probabilities).

    >>> import torch
    >>> apa_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), lam=1.0).item()
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

APA_LAMBDA = 0.1
"""APA's lambda (the advantage coefficient: targets are A / lambda)."""
IS_BETA = 0.1
"""IS-DAAs' beta (the DPO/IPO regularisation strength; the authors' config default)."""
IS_CLIP_EPS = 1.0
"""IS-DAAs' clipping constant: the ratio is capped at exp(2 * eps) (eps=1.0 in the authors' IS-DPO runs)."""


def apa_loss(logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             *, lam: float = APA_LAMBDA) -> torch.Tensor:
    """APA's squared error, averaged over the response tokens `mask` selects.

    logp, ref_logp: (B, T) log-probabilities of the sampled tokens under the policy and pi_init;
    advantages: (B, T) (or (B, 1), broadcast); mask: (B, T) 1 at response tokens.
    """
    target = advantages / lam  # (B, T)
    err = (logp - ref_logp - target) ** 2 * mask  # (B, T)
    return err.sum() / mask.sum().clamp(min=1)


def apa_sequence_loss(logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor, *,
                      lam: float = APA_LAMBDA) -> torch.Tensor:
    """APA with the whole response as the action (the bandit view DPO also takes): when only a
    final reward is known, A(x, y) = R - b(x) belongs to the response, not to any one token.

    logp, ref_logp: (B,) summed log-probabilities of each response; advantages: (B,)."""
    return ((logp - ref_logp - advantages / lam) ** 2).mean()


@dataclass
class PairLoss:
    loss: torch.Tensor
    """Scalar: the mean of the weighted per-pair losses."""
    losses: torch.Tensor
    """(P,) per-pair losses, weights included."""
    weights: torch.Tensor
    """(P,) the clipped importance ratios (no gradient)."""
    margins: torch.Tensor
    """(P,) h = policy log-ratio of the pair minus the reference's (no gradient)."""


def is_daa_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                *, beta: float = IS_BETA, clip_eps: float = IS_CLIP_EPS, kind: str = "dpo",
                data_chosen: torch.Tensor | None = None, data_rejected: torch.Tensor | None = None,
                sft_weight: float = 0.0, chosen_tokens: torch.Tensor | None = None) -> PairLoss:
    """IS-DPO (`kind="dpo"`) or IS-IPO (`kind="ipo"`) on (P,) sequence log-probabilities of the
    chosen and rejected responses under the policy, the reference and (optionally) the behaviour
    policy that sampled them (default: the reference). `clip_eps=None` turns the weights off
    (plain DPO/IPO). `sft_weight` adds RPO's per-token NLL of the chosen answers (`chosen_tokens`:
    their (P,) response lengths)."""
    data_chosen = ref_chosen if data_chosen is None else data_chosen
    data_rejected = ref_rejected if data_rejected is None else data_rejected
    h = (chosen - rejected) - (ref_chosen - ref_rejected)  # (P,)
    if kind == "dpo":
        per_pair = -F.logsigmoid(beta * h)  # (P,)
    elif kind == "ipo":
        per_pair = (h - 1 / (2 * beta)) ** 2  # (P,)
    else:
        raise ValueError(f"kind must be 'dpo' or 'ipo', got {kind!r}")
    with torch.no_grad():
        if clip_eps is None:
            w = torch.ones_like(h)
        else:
            log_w = (chosen - data_chosen) + (rejected - data_rejected)  # (P,)
            w = torch.exp(log_w.clamp(max=2 * clip_eps))
    losses = w * per_pair
    if sft_weight:
        if chosen_tokens is None:
            raise ValueError("sft_weight needs chosen_tokens (the chosen responses' lengths)")
        losses = losses + sft_weight * -chosen / chosen_tokens.clamp(min=1)
    return PairLoss(losses.mean(), losses, w, h.detach())


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of `input_ids` under `logits` (B, L, V), and their sum over `mask`.

    Token t is predicted by the logits at t-1: returns token_logps (B, L) with column 0 zero, and
    (B,) sums over positions where `mask` (B, L) is 1 (the response tokens)."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L-1, V)
    picked = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
    token_logps = F.pad(picked, (1, 0))  # (B, L)
    return token_logps, (token_logps * mask).sum(-1)


def position_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """(B, L-1) KL(p || q) over the whole vocabulary at each position that predicts a next token.
    p_logits, q_logits: (B, L, V)."""
    lp = torch.log_softmax(p_logits[:, :-1].float(), dim=-1)  # (B, L-1, V)
    lq = torch.log_softmax(q_logits[:, :-1].float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def cover_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(ref || pi) over the whole vocabulary at each response position, summed over each response and
    averaged over the responses: the forward, mass-covering direction, which grows when the policy
    drops text the base model would say (the reverse KL that PPO and DPO bound lets the policy sharpen
    onto a few of the base's answers almost for free). With gradient through `logits`; `ref_logits`
    carry none. logits, ref_logits: (B, L, V); mask: (B, L) 1 at the response tokens.

        >>> x = torch.randn(2, 3, 5)
        >>> float(cover_kl(x, x, torch.ones(2, 3)))
        0.0
    """
    return (position_kl(ref_logits, logits) * mask[:, 1:].float()).sum(-1).mean()


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over `mask`ed positions of KL(pi || ref) over the whole vocabulary at each position
    (the positions that predicted those tokens). logits, ref_logits: (B, L, V); mask: (B, L)."""
    m = mask[:, 1:].float()
    return (position_kl(logits, ref_logits) * m).sum() / m.sum().clamp(min=1)


__all__ = ["APA_LAMBDA", "IS_BETA", "IS_CLIP_EPS", "PairLoss", "apa_loss", "apa_sequence_loss", "cover_kl", "is_daa_loss", "position_kl", "sequence_logps", "token_kl"]
