"""Hard (stochastic) attention, section 4.1 of Show, Attend and Tell: `--attention hard` in train.py.

Soft attention feeds the LSTM the expected context z_t = sum_i alpha_ti a_i. Hard attention instead picks
one location s_t of the feature grid and feeds that location's vector alone (equation numbers as in the
paper's arXiv version, 1502.03044):

    (8)  p(s_t,i = 1 | s_j<t, a) = alpha_t,i             s_t ~ Multinoulli_L(alpha_t)
    (9)  z_t = sum_i s_t,i a_i                           the chosen location's feature vector

Picking is not differentiable, so training maximises a lower bound on the log-likelihood,

    (10) L_s = sum_s p(s | a) log p(y | s, a)  <=  log p(y | a)

whose gradient needs a sum over every sequence of locations; one sample s~ per caption estimates it:

    (11) dL_s/dW ~ d log p(y | s~, a)/dW + log p(y | s~, a) d log p(s~ | a)/dW

The second term is REINFORCE: it raises the probability of the locations that led to a likely caption.
Its variance is high, so the paper subtracts a moving-average baseline b and adds an entropy bonus:

    b_k = 0.9 b_(k-1) + 0.1 log p(y | s~_k, a)
    (12) dL_s/dW ~ d log p(y | s~, a)/dW + lambda_r (log p(y | s~, a) - b) d log p(s~ | a)/dW + lambda_e dH[s~]/dW

Why b: the reward log p(y | s~, a) is always negative, so without b every sampled location would be pushed
down. Subtracting its running mean rewards locations only for doing better than usual, which leaves the
expected gradient unchanged (E[d log p(s~|a)/dW] = 0) and lowers its variance (tests/test_hard_attention.py
measures both). Why H: the entropy bonus keeps alpha from collapsing onto one location early, while the
samples are still poor. Finally, with probability 0.5 a step uses the expected context instead of a
sample (the paper's own trick, per step here): that step then trains like soft attention.

At inference a model uses the expected context (--hard-inference expected) or the most likely location
(argmax); the checkpoint's config records which, and every decoder (beam search, eval.py, caption.py)
follows it.
"""
import torch
import torch.nn.functional as F

from models import Attention

# Defaults, from the paper: the baseline's decay (0.9) and the probability of the expected context (0.5)
# are stated in section 4.1. lambda_r = 1 is eq. (11)'s own, unscaled REINFORCE term. lambda_e is not given
# in the paper (it was cross-validated); 0.002 is the entropy weight of the authors' released code.
BASELINE_DECAY, EXPECTED_CONTEXT_PROB, REINFORCE_WEIGHT, ENTROPY_WEIGHT = 0.9, 0.5, 1.0, 0.002
HARD_INFERENCE = ("expected", "argmax")


def sample_locations(features, alpha, expected_context, expected_prob):
    """Hard attention's context for a training step.

    features (rows, num_pixels, encoder_dim), alpha (rows, num_pixels), expected_context (rows, encoder_dim).
    Returns context (rows, encoder_dim) and the chosen locations (rows,), -1 on the rows that used the
    expected context instead (each row with probability expected_prob)."""
    # EXERCISE 8 >>> Hard attention: sample one location per row from alpha, use its feature vector as the context.
    # Hint: torch.multinomial on alpha (no gradient flows through a sample); rows where torch.rand < expected_prob
    #       keep expected_context and get location -1. Make every new tensor on alpha's device.
    # Paper: eq. (8) s_t ~ Multinoulli_L(alpha_t), eq. (9) z_t = sum_i s_t,i a_i
    rows = alpha.shape[0]
    locations = torch.multinomial(alpha.detach().float(), 1).squeeze(1)  # (rows,)
    picked = features[torch.arange(rows, device=alpha.device), locations]  # (rows, encoder_dim)
    use_expected = torch.rand(rows, device=alpha.device) < expected_prob  # (rows,)
    context = torch.where(use_expected.unsqueeze(1), expected_context, picked)  # (rows, encoder_dim)
    return context, locations.masked_fill(use_expected, -1)  # (rows, encoder_dim), (rows,)
    # <<< EXERCISE 8


def argmax_context(features, alpha):
    """features (batch, num_pixels, encoder_dim), alpha (batch * beams, num_pixels) -> the most attended
    location's vector for every row (batch * beams, encoder_dim); the beams of one image are adjacent rows."""
    rows, batch = alpha.shape[0], features.shape[0]
    image = torch.arange(rows, device=alpha.device) // (rows // batch)  # (rows,): each row's image
    return features[image, alpha.argmax(dim=1)]  # (rows, encoder_dim)


class HardAttention(Attention):
    """Attention whose context is one location: sampled while training with teacher forcing (the decoder
    turns `recording` on), the expected context or the argmax location when decoding (`inference`)."""

    def __init__(self, encoder_dim, decoder_dim, attention_dim, expected_prob=EXPECTED_CONTEXT_PROB,
                 inference="expected"):
        super().__init__(encoder_dim, decoder_dim, attention_dim)
        self.expected_prob, self.inference = expected_prob, inference
        self.recorded = None  # a list while recording: one (rows,) tensor of locations per step

    def forward(self, features, projected, h):
        context, alpha = super().forward(features, projected, h)  # (rows, encoder_dim), (rows, num_pixels)
        if self.recorded is not None:
            context, locations = sample_locations(features, alpha, context, self.expected_prob)
            self.recorded.append(locations)  # (rows,)
        elif self.inference == "argmax":
            context = argmax_context(features, alpha)  # (rows, encoder_dim)
        return context, alpha


def recorded_locations(attention, active, batch, steps, device):
    """The locations the decoder's hard attention sampled in one teacher-forced pass -> (batch, steps),
    -1 where the expected context was used or the caption had ended. active[t]: captions running at step t."""
    locations = torch.full((batch, steps), -1, dtype=torch.long, device=device)  # (batch, steps)
    for t, chosen in enumerate(attention.recorded):
        locations[: active[t], t] = chosen  # (active[t],)
    attention.recorded = None
    return locations


class MovingBaseline:
    """b_k = decay * b_(k-1) + (1 - decay) * mean reward of batch k; starts at the first batch's mean."""

    def __init__(self, decay=BASELINE_DECAY):
        self.decay, self.value = decay, None

    def update(self, rewards):
        """rewards (batch,) -> the baseline to use for this batch (from the batches before it), then update."""
        mean = float(rewards.mean())
        used = mean if self.value is None else self.value
        self.value = mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean
        return used

    def state_dict(self):
        return {"decay": self.decay, "value": self.value}

    def load_state_dict(self, state):
        self.decay, self.value = state["decay"], state["value"]


def hard_attention_objective(word_log_probs, word_mask, alphas, locations, baseline, reinforce_weight=REINFORCE_WEIGHT,
                             entropy_weight=ENTROPY_WEIGHT):
    """The surrogate whose gradient is eq. (12), negated to be minimised, per real word (like cross-entropy).

    word_log_probs (batch, steps): log p(y_t | s~, a) of each target word; word_mask (batch, steps): True on
    real words; alphas (batch, steps, num_pixels); locations (batch, steps), -1 where no location was sampled;
    baseline: a float. Returns (loss, log p(y | s~, a) per caption (batch,), detached)."""
    # EXERCISE 9 >>> The REINFORCE term: reward (log p(y|s~,a) - b) times log p(s~|a), plus the entropy bonus.
    # Hint: sum word log-probs over real words per caption; log p(s~|a) = sum over sampled steps of
    #       log alpha at the chosen location; detach the reward; divide the whole objective by the word count.
    # Paper: eq. (12), with b_k = 0.9 b_(k-1) + 0.1 log p(y|s~_k, a)
    log_p_y = (word_log_probs * word_mask).sum(dim=1)  # (batch,)
    sampled = (locations >= 0) & word_mask  # (batch, steps)
    log_alpha = torch.log(alphas.clamp(min=1e-12))  # (batch, steps, num_pixels)
    chosen = log_alpha.gather(2, locations.clamp(min=0).unsqueeze(2)).squeeze(2)  # (batch, steps)
    log_p_s = (chosen * sampled).sum(dim=1)  # (batch,)
    entropy = (-(alphas * log_alpha).sum(dim=2) * word_mask).sum(dim=1)  # (batch,): H of each step's alpha
    reward = log_p_y.detach() - baseline  # (batch,)
    objective = log_p_y + reinforce_weight * reward * log_p_s + entropy_weight * entropy  # (batch,)
    return -objective.sum() / word_mask.sum().clamp(min=1), log_p_y.detach()
    # <<< EXERCISE 9


def hard_attention_loss(encoder, decoder, inputs, captions, caplens, cached, alpha_c, baseline,
                        reinforce_weight=REINFORCE_WEIGHT, entropy_weight=ENTROPY_WEIGHT):
    """train.py's loss for --attention hard, called like compute_loss: the negated eq. (12) surrogate per real
    word. alpha_c is not used: the doubly stochastic term regularises soft attention (section 4.2.1); hard
    attention has the entropy term instead. Returns (loss, scores (n, vocab), targets (n,)) over real words."""
    features = encoder(inputs) if not cached else inputs.float()  # (batch, num_pixels, encoder_dim)
    # in length order: scores (batch, steps, vocab), captions, lengths (batch,), alphas (batch, steps, num_pixels)
    scores, in_order, lengths, alphas, _ = decoder(features, captions, caplens)
    locations = getattr(decoder, "module", decoder).sampled_locations  # (batch, steps); DDP wraps the decoder
    steps = scores.shape[1]
    next_words = in_order[:, 1:][:, :steps]  # (batch, steps): the word each step predicts
    real = torch.arange(steps, device=lengths.device).expand(len(lengths), steps) < lengths.unsqueeze(1)  # (batch, steps)
    word_log_probs = -F.cross_entropy(scores.float().transpose(1, 2), next_words, reduction="none")  # (batch, steps)
    b = baseline.update((word_log_probs.detach() * real).sum(dim=1))  # from the batches before, then updated
    loss, _ = hard_attention_objective(word_log_probs, real, alphas.float(), locations, b, reinforce_weight,
                                       entropy_weight)
    return loss, scores[real], next_words[real]
