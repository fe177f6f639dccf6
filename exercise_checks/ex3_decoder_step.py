"""Exercise 3 (models.py): DecoderWithAttention.step, with the attention (exercise 2) stubbed out."""
import torch

from .common import (CheckFailed, close, expect, expect_same_gradients, expect_tensor, expect_tuple,
                     largest_difference, load, small_decoder)


class AttentionStub(torch.nn.Module):
    """Stands in for exercise 2: a known context (which depends on h, so gradients can flow) and alpha."""

    def __init__(self, context_base, alpha):
        super().__init__()
        self.context_base, self.alpha, self.calls = context_base, alpha, []

    def forward(self, features, projected, h):
        self.calls.append((features, projected, h))
        context = self.context_base + 0.1 * h.sum(dim=1, keepdim=True)  # (batch, encoder_dim)
        return context, self.alpha


def lstm_cell_by_hand(cell, x, h, c):
    """nn.LSTMCell written out: gates in PyTorch's order input, forget, cell, output."""
    gates = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh  # (batch, 4 * decoder_dim)
    i, f, g, o = gates.chunk(4, dim=1)  # 4 x (batch, decoder_dim)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (batch, decoder_dim)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)  # (batch, decoder_dim)
    return h_new, c_new


def step_by_hand(decoder, context, embedded, h, c, gated=True):
    """Section 4.2.1: beta = sigmoid(f_beta(h_{t-1})); LSTM input [embedded word; beta * context]."""
    beta = torch.sigmoid(h @ decoder.f_beta.weight.T + decoder.f_beta.bias)  # (batch, encoder_dim)
    x = torch.cat([embedded, beta * context if gated else context], dim=1)  # (batch, embed_dim + encoder_dim)
    return lstm_cell_by_hand(decoder.lstm_cell, x, h, c)


def check(folder):
    models = load(folder, "models")
    decoder = small_decoder(models)
    batch, num_pixels, encoder_dim, embed_dim, decoder_dim = 2, 5, 6, 3, 4
    context_base = torch.randn(batch, encoder_dim)  # (batch, encoder_dim)
    stub_alpha = torch.softmax(torch.randn(batch, num_pixels), dim=1)  # (batch, num_pixels)
    decoder.attention = AttentionStub(context_base, stub_alpha)
    embedded = torch.randn(batch, embed_dim, requires_grad=True)  # (batch, embed_dim)
    h = torch.randn(batch, decoder_dim, requires_grad=True)  # (batch, decoder_dim)
    c = torch.randn(batch, decoder_dim, requires_grad=True)  # (batch, decoder_dim)
    features = torch.randn(batch, num_pixels, encoder_dim)  # (batch, num_pixels, encoder_dim)
    projected = torch.randn(batch, num_pixels, 5)  # (batch, num_pixels, attention_dim)

    out = decoder.step(embedded, h, c, features, projected)  # h, c (batch, decoder_dim), alpha (batch, num_pixels)
    expect_tuple(out, 3, "h, c, alpha")
    new_h, new_c, alpha = out
    calls = decoder.attention.calls
    expect(len(calls) == 1, f"self.attention was called {len(calls)} times; a step attends exactly once")
    got_features, got_projected, got_h = calls[0]
    expect(got_features is features and got_projected is projected,
           "self.attention should get the step's features and projected as they are")
    expect(torch.equal(got_h, h), "self.attention should get the previous hidden state h (h_{t-1})")
    expect_tensor("h", new_h, (batch, decoder_dim), "(batch, decoder_dim)")
    expect_tensor("c", new_c, (batch, decoder_dim), "(batch, decoder_dim)")
    expect(alpha is stub_alpha or torch.equal(alpha, stub_alpha), "the alpha returned is not the attention's alpha")

    context = context_base + 0.1 * h.sum(dim=1, keepdim=True)  # (batch, encoder_dim): what the stub returned
    wanted_h, wanted_c = step_by_hand(decoder, context, embedded, h, c)
    if not (close(new_h, wanted_h) and close(new_c, wanted_c)):
        ungated_h, ungated_c = step_by_hand(decoder, context, embedded, h, c, gated=False)
        expect(not (close(new_h, ungated_h) and close(new_c, ungated_c)),
               "the context is not gated: feed beta * context with beta = sigmoid(f_beta(h))")
        raise CheckFailed(f"the new h and c differ from the hand computation (largest difference "
                          f"{max(largest_difference(new_h, wanted_h), largest_difference(new_c, wanted_c)):.3g})")

    weights_h, weights_c = torch.randn(batch, decoder_dim), torch.randn(batch, decoder_dim)  # 2 x (batch, decoder_dim)
    expect_same_gradients((new_h * weights_h).sum() + (new_c * weights_c).sum(),
                          (wanted_h * weights_h).sum() + (wanted_c * weights_c).sum(),
                          [("embedded", embedded), ("h", h), ("c", c), ("f_beta.weight", decoder.f_beta.weight),
                           ("lstm_cell.weight_ih", decoder.lstm_cell.weight_ih)], "the step")
