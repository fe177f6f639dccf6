"""What every check shares: the verdict exception, importing the copy under test, comparing tensors."""
import importlib
import os

import torch


class CheckFailed(Exception):
    """A check's verdict: the one-line reason why an exercise is wrong."""


def expect(condition, reason):
    if not condition:
        raise CheckFailed(reason)


def load(folder, name):
    """Import module `name` from the copy under test (and nowhere else)."""
    module = importlib.import_module(name)
    found = os.path.realpath(os.path.dirname(module.__file__))
    expect(found == os.path.realpath(folder), f"{name}.py was not found in {folder}")
    return module


def largest_difference(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def close(a, b, tol=1e-5):
    """Same shape and values within tol."""
    return tuple(a.shape) == tuple(b.shape) and largest_difference(a, b) <= tol


def expect_tensor(name, value, shape, meaning):
    expect(isinstance(value, torch.Tensor), f"{name} should be a tensor; got {type(value).__name__}")
    expect(tuple(value.shape) == tuple(shape),
           f"{name} has shape {tuple(value.shape)}; expected {tuple(shape)} {meaning}")


def expect_tuple(value, length, names):
    got = f"a tuple of {len(value)}" if isinstance(value, (tuple, list)) else type(value).__name__
    expect(isinstance(value, (tuple, list)) and len(value) == length, f"should return ({names}); got {got}")


def expect_same_gradients(student_loss, hand_loss, named_inputs, what):
    """Gradients of two scalar losses with respect to the same inputs must agree."""
    names, inputs = zip(*named_inputs)
    expect(student_loss.requires_grad, f"no gradient flows back through {what} (was something detached?)")
    student = torch.autograd.grad(student_loss, inputs, allow_unused=True)
    hand = torch.autograd.grad(hand_loss, inputs, allow_unused=True)
    for name, got, wanted in zip(names, student, hand):
        expect(got is not None, f"no gradient reaches {name} through {what} (was it detached?)")
        expect(close(got, wanted, 1e-4), f"the gradient for {name} differs from the hand computation "
                                         f"(largest difference {largest_difference(got, wanted):.3g})")


def small_decoder(models, vocab_size=11):
    """A decoder with every size different, so a mixed-up dimension shows (exercises 3 and 4)."""
    return models.DecoderWithAttention(attention_dim=5, embed_dim=3, decoder_dim=4, vocab_size=vocab_size,
                                       encoder_dim=6, dropout=0.0).eval()
