"""APA and IS-DAAs losses against values worked out by hand on tiny tensors."""

import math

import pytest
import torch

from trainer.distill_losses import apa_loss, cover_kl, is_daa_loss, sequence_logps, token_kl


def t(*rows):
    return torch.tensor(rows, dtype=torch.float)


def test_apa_hand_computed():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    adv = t([0.1, -0.2])
    # targets A/lambda = [1, -2]; log-ratios [0.5, -1]; errors (0.5-1)^2 = 0.25, (-1+2)^2 = 1
    assert apa_loss(logp, ref, adv, t([1, 1]), lam=0.1).item() == pytest.approx(0.625)
    assert apa_loss(logp, ref, adv, t([1, 0]), lam=0.1).item() == pytest.approx(0.25)  # padding never counts
    # lambda = 1: targets [0.1, -0.2]: (0.4)^2 = 0.16, (-0.8)^2 = 0.64
    assert apa_loss(logp, ref, adv, t([1, 1]), lam=1.0).item() == pytest.approx(0.40)


def test_apa_minimum_is_the_advantage_target():
    ref = t([-1.0, -2.0])
    logp = (ref + t([0.5, -0.25]) / 0.5).requires_grad_()
    loss = apa_loss(logp, ref, t([0.5, -0.25]), t([1, 1]), lam=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.0)
    assert torch.allclose(logp.grad, torch.zeros(1, 2))


def test_is_dpo_ratio_one_is_plain_dpo():
    # h = (-1 - -3) - (-2 - -2) = 2; beta 0.5: -log sigmoid(1) = log(1 + e^-1); log w = 1 + -1 = 0
    out = is_daa_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert out.weights.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1)))


def test_is_dpo_clip_inactive():
    # log w = (-1.5 + 2) + (-2 + 2) = 0.5 < 2 * eps = 2: w = e^0.5; h = 0.5
    chosen = torch.tensor([-1.5], requires_grad=True)
    out = is_daa_loss(chosen, torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5, clip_eps=1.0)
    assert out.weights.item() == pytest.approx(math.exp(0.5))
    assert out.loss.item() == pytest.approx(math.exp(0.5) * math.log1p(math.exp(-0.25)))
    out.loss.backward()  # the weight is a constant: d/dchosen = w * -beta * sigmoid(-beta h)
    assert chosen.grad.item() == pytest.approx(math.exp(0.5) * -0.5 / (1 + math.exp(0.25)))


def test_is_dpo_clip_active():
    # log w = (-0.5 + 2) + (-1 + 2) = 2.5 > 2 * eps = 2: w = e^2; h = 0.5
    out = is_daa_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
                      beta=0.5, clip_eps=1.0)
    assert out.weights.item() == pytest.approx(math.exp(2.0))
    assert out.loss.item() == pytest.approx(math.exp(2.0) * math.log1p(math.exp(-0.25)))
    loose = is_daa_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
                        beta=0.5, clip_eps=2.0)  # cap e^4: the ratio e^2.5 passes
    assert loose.weights.item() == pytest.approx(math.exp(2.5))


def test_is_ipo_and_behaviour_policy():
    # IPO: (h - 1/(2 beta))^2 = (0.5 - 1)^2; behaviour log-probs make log w = (-0.5+1) + (-1+1) = 0.5
    out = is_daa_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
                      beta=0.5, clip_eps=1.0, kind="ipo", data_chosen=torch.tensor([-1.0]),
                      data_rejected=torch.tensor([-1.0]))
    assert out.loss.item() == pytest.approx(math.exp(0.5) * 0.25)
    with pytest.raises(ValueError, match="kind"):
        is_daa_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), kind="kto")


def test_sft_weight_adds_the_chosen_answers_per_token_nll():
    # RPO: DPO's log(1 + e^-1) (h = 2, beta 0.5) plus alpha * -(-1) / 4 tokens, and its gradient on chosen
    chosen = torch.tensor([-1.0], requires_grad=True)
    out = is_daa_loss(chosen, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5,
                      sft_weight=2.0, chosen_tokens=torch.tensor([4.0]))
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1)) + 2.0 * 1.0 / 4)
    out.loss.backward()  # DPO's -beta * sigmoid(-beta h) and the NLL's -alpha / tokens
    assert chosen.grad.item() == pytest.approx(-0.5 / (1 + math.exp(1)) - 2.0 / 4)
    plain = is_daa_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert plain.loss.item() == pytest.approx(math.log1p(math.exp(-1)))  # 0: off
    with pytest.raises(ValueError, match="chosen_tokens"):
        is_daa_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), sft_weight=1.0)


def test_sequence_logps_and_kl():
    logits = torch.zeros(1, 3, 4)  # uniform: every token has log-prob log(1/4)
    ids = torch.tensor([[1, 2, 3]])
    token, total = sequence_logps(logits, ids, t([0, 1, 1]))
    assert token[0, 0].item() == 0.0
    assert total.item() == pytest.approx(2 * math.log(0.25))
    assert token_kl(logits, logits, t([0, 1, 1])).item() == pytest.approx(0.0)
    peaked = logits.clone()
    peaked[..., 0] = math.log(3.0)  # p = [1/2, 1/6, 1/6, 1/6] vs uniform
    kl = 0.5 * math.log(2) + 3 * (1 / 6) * math.log(4 / 6)
    assert token_kl(peaked, logits, t([0, 1, 1])).item() == pytest.approx(kl, rel=1e-5)


def test_apa_sequence_hand_computed():
    from trainer.distill_losses import apa_sequence_loss

    # log-ratios [1, -0.5]; targets A/lambda = [0.5/0.5, 0.25/0.5] = [1, 0.5]: errors 0 and 1
    loss = apa_sequence_loss(torch.tensor([-2.0, -3.5]), torch.tensor([-3.0, -3.0]), torch.tensor([0.5, 0.25]), lam=0.5)
    assert loss.item() == pytest.approx(0.5)


def test_cover_kl_is_the_forward_kl_summed_per_response():
    uniform = torch.zeros(2, 3, 4)
    peaked = uniform.clone()
    peaked[..., 0] = math.log(3.0)  # p = [1/2, 1/6, 1/6, 1/6]
    mask = t([0, 1, 1], [0, 0, 1])  # 2 response tokens, then 1
    per_token = 0.25 * math.log(0.25 / 0.5) + 3 * 0.25 * math.log(0.25 / (1 / 6))  # KL(uniform || peaked)
    assert cover_kl(peaked, uniform, mask).item() == pytest.approx((2 + 1) * per_token / 2, rel=1e-5)
    reverse = 0.5 * math.log(2) + 3 * (1 / 6) * math.log(4 / 6)  # KL(peaked || uniform): not this
    assert abs(per_token - reverse) > 0.01
    assert cover_kl(peaked, uniform, mask).item() != pytest.approx((2 + 1) * reverse / 2, rel=1e-3)
    policy = peaked.clone().requires_grad_(True)  # the gradient moves the policy back toward the base
    cover_kl(policy, uniform, mask).backward()
    assert policy.grad[0, 0, 0] > 0 and policy.grad[0, 0, 1] < 0  # position 0 predicts a response token
    assert torch.all(policy.grad[1, 0] == 0)  # position 0 of row 2 predicts a prompt token
