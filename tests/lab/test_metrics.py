"""The pure functions behind eval and plot, against values worked out by hand."""

from __future__ import annotations

import math

import torch

from mergekit_rl.lab import metrics


def test_token_kl_of_two_known_distributions() -> None:
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    logits_p = torch.stack([p, p, p]).unsqueeze(0)  # [1, 3, 2]
    logits_q = torch.stack([q, p, q]).unsqueeze(0)  # position 1: p == q, KL 0
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the last position does not count
    total, n = metrics.token_kl(logits_p + 3.0, logits_q - 1.0, mask)  # logits shift freely
    assert n.item() == 2
    assert math.isclose(total.item(), 0.5 * math.log(4 / 3), rel_tol=1e-6)


def test_token_nll_matches_log_probabilities() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(2.0), 0.0]]])  # [1, 2, 2]
    targets = torch.tensor([[1, 1]])
    total, n = metrics.token_nll(logits, targets, torch.ones(1, 2))
    # p(1) = 3/4 at position 0, 1/3 at position 1
    assert n.item() == 2
    assert math.isclose(total.item(), -math.log(0.75) - math.log(1 / 3), rel_tol=1e-6)


def test_completion_mask_stops_after_first_eos() -> None:
    eos, pad = 2, 0
    comp = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
    want = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float)
    assert torch.equal(metrics.completion_mask(comp, eos, pad), want)
    # pad == eos (a tokenizer without a pad token): the first eos counts, the rest do not
    comp2 = torch.tensor([[5, 2, 2, 2]])
    assert metrics.completion_mask(comp2, 2, 2).tolist() == [[1, 1, 0, 0]]


def test_position_ids_skip_left_padding() -> None:
    attn = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert metrics.position_ids(attn).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_mean_se_win_rate_pareto() -> None:
    mean, se = metrics.mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert math.isclose(se, math.sqrt((1.5**2 * 2 + 0.5**2 * 2) / 3 / 4))
    assert metrics.mean_se([7.0]) == (7.0, 0.0)
    assert metrics.win_rate([1.0, 0.0, 0.5], [0.0, 1.0, 0.5]) == 0.5
    assert metrics.win_rate([1.0, 1.0], [0.0, 1.0]) == 0.75
    # (cost, gain): 1 dominates 3 (less cost, more gain); 4 has the most gain; 0 the least cost
    pts = [(0.0, 0.0), (1.0, 2.0), (2.0, 2.5), (1.5, 1.0), (3.0, 3.0)]
    assert metrics.pareto_front(pts) == [0, 1, 2, 4]


def test_average_states_is_the_uniform_mean() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([1.0])}
    got = metrics.average_states([a, b])
    assert got["w"].tolist() == [2.0, 4.0]
    assert got["b"].tolist() == [0.5]
    assert a["w"].tolist() == [1.0, 2.0]  # inputs untouched
