"""Exercise 2 (models.py): Attention.forward, against eqs. (4)-(6) computed one pixel at a time."""
import torch

from .common import (CheckFailed, close, expect, expect_same_gradients, expect_tensor, expect_tuple,
                     largest_difference, load)


def attention_by_hand(attention, features, projected, h):
    """Eqs. (4)-(6) one hypothesis and one pixel at a time: e_i = w . relu(projected_i + W_h h + b_h),
    alpha = softmax_i(e), context = sum_i alpha_i a_i. Row r of h belongs to image r // beams."""
    W_h = attention.decoder_att.weight  # (attention_dim, decoder_dim)
    b_h = attention.decoder_att.bias  # (attention_dim,)
    w = attention.full_att.weight[0]  # (attention_dim,)
    beams = h.shape[0] // features.shape[0]
    contexts, alphas = [], []
    for r in range(h.shape[0]):
        b = r // beams  # the image this hypothesis describes
        query = W_h @ h[r] + b_h  # (attention_dim,)
        e = torch.stack([w @ torch.clamp(projected[b, i] + query, min=0)
                         for i in range(features.shape[1])])  # (num_pixels,)
        weights = torch.exp(e - e.max())  # (num_pixels,), shifted so exp cannot overflow
        alpha = weights / weights.sum()  # (num_pixels,)
        contexts.append(sum(alpha[i] * features[b, i] for i in range(features.shape[1])))  # (encoder_dim,)
        alphas.append(alpha)
    return torch.stack(contexts), torch.stack(alphas)  # (rows, encoder_dim), (rows, num_pixels)


def check(folder):
    models = load(folder, "models")
    batch, num_pixels, encoder_dim, decoder_dim, attention_dim = 3, 5, 6, 4, 7
    attention = models.Attention(encoder_dim, decoder_dim, attention_dim)
    features = torch.randn(batch, num_pixels, encoder_dim, requires_grad=True)  # (batch, num_pixels, encoder_dim)
    # random, not W_a a_i: forward must use `projected` as given (it is computed once per batch)
    projected = torch.randn(batch, num_pixels, attention_dim, requires_grad=True)  # (batch, num_pixels, attention_dim)
    h = torch.randn(batch, decoder_dim, requires_grad=True)  # (batch, decoder_dim)

    out = attention(features, projected, h)  # context (batch, encoder_dim), alpha (batch, num_pixels)
    expect_tuple(out, 2, "context, alpha")
    context, alpha = out
    expect_tensor("context", context, (batch, encoder_dim), "(batch, encoder_dim)")
    expect_tensor("alpha", alpha, (batch, num_pixels), "(batch, num_pixels)")
    sums = alpha.detach().sum(dim=1)  # (batch,)
    worst = float(sums[(sums - 1).abs().argmax()])
    expect(abs(worst - 1) < 1e-4, f"attention weights do not sum to 1 over pixels (got {worst:.2f})")
    expect(float(alpha.min()) >= 0, "attention weights should not be negative (use a softmax)")

    wanted_context, wanted_alpha = attention_by_hand(attention, features, projected, h)
    if not close(alpha, wanted_alpha, 1e-5):
        recomputed = attention_by_hand(attention, features, attention.project_features(features), h)[1]  # (batch, P)
        expect(not close(alpha, recomputed, 1e-5),
               "alpha ignores the `projected` argument (it recomputes W_a a_i); use projected as given")
        raise CheckFailed(f"alpha differs from the hand computation of eqs. (4)-(5) "
                          f"(largest difference {largest_difference(alpha, wanted_alpha):.3g})")
    expect(close(context, wanted_context, 1e-5),
           f"context is not sum_i alpha_i a_i (largest difference {largest_difference(context, wanted_context):.3g})")

    weights_c = torch.randn(batch, encoder_dim)  # (batch, encoder_dim): a random scalar loss tests every gradient
    weights_a = torch.randn(batch, num_pixels)  # (batch, num_pixels)
    expect_same_gradients((context * weights_c).sum() + (alpha * weights_a).sum(),
                          (wanted_context * weights_c).sum() + (wanted_alpha * weights_a).sum(),
                          [("features", features), ("projected", projected), ("h", h),
                           ("decoder_att.weight", attention.decoder_att.weight),
                           ("full_att.weight", attention.full_att.weight)], "the attention")
    check_attention_with_beams(attention, features.detach(), projected.detach())


def check_attention_with_beams(attention, features, projected):
    """Beam search passes several hypotheses per image: h has batch * beams rows, features only batch."""
    beams = 2
    h = torch.randn(features.shape[0] * beams, attention.decoder_att.in_features)  # (batch * beams, decoder_dim)
    try:
        context, alpha = attention(features, projected, h)  # (batch * beams, encoder_dim), (batch * beams, num_pixels)
    except RuntimeError as error:
        raise CheckFailed(f"attention fails when h has {beams} rows per image (beam search does this): "
                          f"{str(error).splitlines()[0]}")
    wanted_context, wanted_alpha = attention_by_hand(attention, features, projected, h)
    expect(tuple(alpha.shape) == tuple(wanted_alpha.shape) and close(alpha, wanted_alpha, 1e-5)
           and close(context, wanted_context, 1e-5),
           f"with {beams} hypotheses per image (h of batch * {beams} rows, the rows of one image adjacent), "
           f"row r must attend over image r // {beams}")
