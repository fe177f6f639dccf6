"""Exercise 9 (hard_attention.py): hard_attention_objective, against eq. (12) computed one caption at a time."""
import math

import torch

from .common import CheckFailed, expect, expect_same_gradients, expect_tuple, load


def objective_by_hand(word_log_probs, mask, alphas, locations, baseline, reinforce_weight, entropy_weight):
    """Eq. (12)'s surrogate, negated and divided by the number of real words, one caption and step at a time."""
    total, words = 0.0, 0
    for n in range(word_log_probs.shape[0]):
        log_p_y, log_p_s, entropy = 0.0, 0.0, 0.0
        for t in range(word_log_probs.shape[1]):
            if not mask[n, t]:
                continue
            words += 1
            log_p_y = log_p_y + word_log_probs[n, t]
            if locations[n, t] >= 0:
                log_p_s = log_p_s + torch.log(alphas[n, t, locations[n, t]])
            entropy = entropy - sum(a * torch.log(a) for a in alphas[n, t])
        reward = float(log_p_y) - baseline  # a number: no gradient flows through the reward
        total = total + log_p_y + reinforce_weight * reward * log_p_s + entropy_weight * entropy
    return -total / words


def check(folder):
    hard = load(folder, "hard_attention")
    torch.manual_seed(0)
    batch, steps, num_pixels = 3, 4, 5
    word_log_probs = -torch.rand(batch, steps).mul(3).requires_grad_(True)  # (batch, steps)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)  # (batch, steps)
    logits = torch.randn(batch, steps, num_pixels, requires_grad=True)
    alphas = torch.softmax(logits, dim=2)  # (batch, steps, num_pixels)
    locations = torch.tensor([[0, -1, 3, 2], [4, 1, 2, -1], [-1, 2, 0, 1]])  # (batch, steps); -1: not sampled
    baseline, reinforce_weight, entropy_weight = -4.0, 0.7, 0.05

    out = hard.hard_attention_objective(word_log_probs, mask, alphas, locations, baseline, reinforce_weight,
                                        entropy_weight)
    expect_tuple(out, 2, "loss, log p(y | s, a) per caption")
    loss, log_p_y = out
    expect(isinstance(loss, torch.Tensor) and loss.numel() == 1, "the loss should be a one-element tensor")
    wanted_log_p_y = (word_log_probs * mask).sum(dim=1)  # (batch,)
    expect(tuple(log_p_y.shape) == (batch,) and torch.allclose(log_p_y, wanted_log_p_y.detach(), atol=1e-5),
           "log p(y | s, a) per caption is the sum of its real words' log-probabilities")
    hand_alphas = torch.softmax(logits, dim=2)  # the same values in a graph of their own, for the gradients
    wanted = objective_by_hand(word_log_probs, mask, hand_alphas, locations, baseline, reinforce_weight, entropy_weight)
    if not math.isclose(float(loss), float(wanted), abs_tol=1e-5):
        no_baseline = objective_by_hand(word_log_probs, mask, hand_alphas, locations, 0.0, reinforce_weight,
                                        entropy_weight)
        if math.isclose(float(loss), float(no_baseline), abs_tol=1e-5):
            raise CheckFailed("the baseline is missing: the reward is log p(y | s, a) - b")
        raise CheckFailed(f"the loss is {float(loss):.5f}; eq. (12) gives {float(wanted):.5f} "
                          "(negated, divided by the number of real words)")
    expect_same_gradients(loss, wanted, [("the word log-probabilities", word_log_probs), ("the attention", logits)],
                          "the objective (is the reward detached, and log p(s | a) taken only at sampled steps?)")
