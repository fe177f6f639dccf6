"""Hard attention (hard_attention.py): the sampler, the REINFORCE estimator, the baseline, and the model end to end."""
import json
import os

import torch

import caption
import eval as evaluation
import train
from checkpoints import load_checkpoint
from decoding import beam_search
from hard_attention import (MovingBaseline, argmax_context, hard_attention_loss, hard_attention_objective,
                            sample_locations)
from models import DecoderWithAttention

# 0.999 quantiles of the chi-square distribution (df -> value), from standard tables
CHI2_999 = {5: 20.515, 7: 24.322}


def test_sampled_locations_follow_alpha():
    """A chi-square goodness-of-fit test (seeded): the sampled locations' counts match alpha. With 8 cells the
    statistic exceeds 24.32 with probability 0.001 when the sampler is right."""
    torch.manual_seed(0)
    alpha = torch.tensor([0.30, 0.05, 0.15, 0.10, 0.02, 0.18, 0.12, 0.08])  # (num_pixels,)
    rows = 20000
    features = torch.randn(1, 8, 3).expand(rows, 8, 3)  # (rows, num_pixels, encoder_dim)
    expected_context = torch.zeros(rows, 3)
    context, locations = sample_locations(features, alpha.expand(rows, 8), expected_context, expected_prob=0.0)
    assert (locations >= 0).all()
    assert torch.equal(context, features[torch.arange(rows), locations])  # the chosen location's vector
    counts = torch.bincount(locations, minlength=8).double()  # (num_pixels,)
    wanted = alpha.double() * rows
    chi2 = float(((counts - wanted) ** 2 / wanted).sum())
    assert chi2 < CHI2_999[7], f"chi-square {chi2:.1f} with 7 degrees of freedom: the samples do not follow alpha"
    # a sampler that ignored alpha (uniform) fails the same test by far
    uniform = torch.full((8,), rows / 8, dtype=torch.double)
    assert float(((uniform - wanted) ** 2 / wanted).sum()) > 100 * CHI2_999[7]


def test_expected_context_used_with_its_probability():
    torch.manual_seed(1)
    rows = 10000
    alpha = torch.softmax(torch.randn(rows, 6), dim=1)  # (rows, num_pixels)
    features = torch.randn(rows, 6, 4)
    expected = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (rows, encoder_dim)
    context, locations = sample_locations(features, alpha, expected, expected_prob=0.5)
    used = locations < 0
    assert abs(used.float().mean().item() - 0.5) < 0.02  # 4 standard deviations of a binomial mean
    assert torch.equal(context[used], expected[used])


def toy_estimate(theta, rewards, samples, baseline=None, entropy_weight=0.0):
    """REINFORCE gradient of L_s = sum_s alpha_s r_s for a one-step toy with alpha = softmax(theta), from `samples`
    draws; the reward of location s is r_s (a parameter too, standing in for log p(y|s,a))."""
    theta = theta.clone().requires_grad_(True)
    rewards = rewards.clone().requires_grad_(True)
    alpha = torch.softmax(theta, dim=0).expand(samples, -1).unsqueeze(1)  # (samples, 1, num_pixels)
    features = torch.zeros(samples, theta.numel(), 1)
    _, locations = sample_locations(features, alpha[:, 0], torch.zeros(samples, 1), expected_prob=0.0)
    word_log_probs = rewards[locations].unsqueeze(1)  # (samples, 1): log p(y | s~, a)
    mask = torch.ones(samples, 1, dtype=torch.bool)
    b = baseline.update(word_log_probs.detach()[:, 0]) if baseline is not None else 0.0
    loss, _ = hard_attention_objective(word_log_probs, mask, alpha, locations.unsqueeze(1), b,
                                       entropy_weight=entropy_weight)
    loss.backward()
    return -theta.grad, -rewards.grad  # the objective's gradient (the loss is its negative, per word)


def exact_gradient(theta, rewards):
    theta = theta.clone().requires_grad_(True)
    rewards = rewards.clone().requires_grad_(True)
    (torch.softmax(theta, dim=0) * rewards).sum().backward()  # L_s, summed over every location exactly
    return theta.grad, rewards.grad


def test_reinforce_estimate_matches_the_exact_gradient():
    """Averaged over many samples the estimator of eq. (11) equals the gradient computed by enumerating the
    locations. Tolerance 0.02: with 200,000 samples the estimate's standard error here is below 0.005."""
    torch.manual_seed(2)
    theta = torch.tensor([0.5, -0.3, 1.2, 0.0, -1.0])
    rewards = torch.tensor([-2.0, -0.5, -1.0, -3.0, -0.2])
    exact_theta, exact_rewards = exact_gradient(theta, rewards)
    est_theta, est_rewards = toy_estimate(theta, rewards, samples=200000)
    assert torch.allclose(est_theta, exact_theta, atol=0.02), (est_theta, exact_theta)
    assert torch.allclose(est_rewards, exact_rewards, atol=0.02), (est_rewards, exact_rewards)
    # the entropy term adds lambda_e dH/dtheta, exactly
    theta_e = theta.clone().requires_grad_(True)
    p = torch.softmax(theta_e, dim=0)
    (-(p * p.log()).sum()).backward()
    torch.manual_seed(2)
    with_entropy, _ = toy_estimate(theta, rewards, samples=200000, entropy_weight=0.5)
    assert torch.allclose(with_entropy - est_theta, 0.5 * theta_e.grad, atol=1e-4)


def test_moving_baseline_lowers_the_variance():
    """The same estimator, over 200 batches of 32 samples, with b = 0 and with the moving-average baseline
    (decay 0.9): the rewards are all far below zero, as log-likelihoods of captions are, so without b every
    sample pushes its own location down and the estimate swings widely. Measured: the baseline's variance is
    a small fraction of the plain one; the test asks for at most a quarter."""
    torch.manual_seed(3)
    theta = torch.tensor([0.2, -0.4, 0.9, 0.1])
    rewards = torch.tensor([-30.0, -31.0, -29.0, -30.5])
    plain = torch.stack([toy_estimate(theta, rewards, 32)[0] for _ in range(200)])  # (batches, num_pixels)
    baseline = MovingBaseline(0.9)
    with_b = torch.stack([toy_estimate(theta, rewards, 32, baseline)[0] for _ in range(200)])
    plain_var, baseline_var = plain.var(dim=0).sum().item(), with_b.var(dim=0).sum().item()
    assert baseline_var < 0.25 * plain_var, (baseline_var, plain_var)
    # and it leaves the estimate centred on the exact gradient
    exact, _ = exact_gradient(theta, rewards)
    assert torch.allclose(with_b.mean(dim=0), exact, atol=0.15)


def test_argmax_context_picks_each_rows_location():
    features = torch.randn(2, 4, 3)  # (batch, num_pixels, encoder_dim)
    alpha = torch.tensor([[0.1, 0.7, 0.1, 0.1], [0.4, 0.1, 0.1, 0.4001], [0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    context = argmax_context(features, alpha)  # 2 beams per image: rows 0, 1 -> image 0; rows 2, 3 -> image 1
    assert torch.equal(context, torch.stack([features[0, 1], features[0, 3], features[1, 2], features[1, 0]]))


def test_hard_attention_overfits_eight_captions(toy_word_map, eight_captions):
    """The 8-caption overfit test of test_train, with hard attention: the model must still memorise them
    (greedy decoding with the expected context, and with the argmax location, reproduces every caption)."""
    word_map = toy_word_map(*[f"w{i}" for i in range(1, 11)])
    features, captions, caplens = eight_captions
    torch.manual_seed(0)
    decoder = DecoderWithAttention(attention_dim=16, embed_dim=12, decoder_dim=20, vocab_size=len(word_map),
                                   encoder_dim=24, dropout=0.0, attention="hard")
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    baseline = MovingBaseline()
    for _ in range(400):
        loss, _, _ = hard_attention_loss(None, decoder, features, captions, caplens, True, 0.0, baseline)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert decoder.sampled_locations.shape == (8, 6)
    decoder.eval()
    for inference in ("expected", "argmax"):
        decoder.attention.inference = inference
        hyps = beam_search(decoder, features, word_map, beam_size=1, max_len=10)
        for hyp, cap, n in zip(hyps, captions.tolist(), caplens.tolist()):
            assert hyp["tokens"] == cap[1 : n - 1], inference


def test_soft_decoder_unchanged_bit_for_bit():
    """Soft attention is what it was: the same parameter names, no extra random draws in training (so dropout
    masks and losses repeat exactly), and no sampled locations."""
    torch.manual_seed(4)
    decoder = DecoderWithAttention(16, 12, 20, 15, encoder_dim=24, dropout=0.5)
    assert sorted(decoder.state_dict()) == sorted([
        "attention.encoder_att.weight", "attention.encoder_att.bias", "attention.decoder_att.weight",
        "attention.decoder_att.bias", "attention.full_att.weight", "embedding.weight", "lstm_cell.weight_ih",
        "lstm_cell.weight_hh", "lstm_cell.bias_ih", "lstm_cell.bias_hh", "init_h.weight", "init_h.bias",
        "init_c.weight", "init_c.bias", "f_beta.weight", "f_beta.bias", "fc.weight", "fc.bias"])
    features, captions = torch.randn(3, 5, 24), torch.randint(1, 15, (3, 6))
    caplens = torch.tensor([6, 4, 5])
    decoder.eval()  # no dropout: a forward pass must draw no random numbers at all
    before = torch.get_rng_state()
    decoder(features, captions, caplens)
    assert torch.equal(torch.get_rng_state(), before)
    decoder.train()
    torch.manual_seed(5)
    first = decoder(features, captions, caplens)[0]
    torch.manual_seed(5)
    second = decoder(features, captions, caplens)[0]
    assert torch.equal(first, second) and decoder.sampled_locations is None


def test_hard_checkpoint_round_trip(prepared, tiny_model_args, tmp_path, capsys):
    """train.py --attention hard writes a checkpoint that records it, resumes, and that eval.py and caption.py
    accept; decoding follows the recorded --hard-inference."""
    out = str(tmp_path / "hard")
    args = ["--data-folder", prepared[0], "--epochs", "1", "--out-dir", out, "--attention", "hard",
            "--hard-inference", "argmax", *tiny_model_args]
    train.main(args)
    best = os.path.join(out, "best.pt")
    ckpt = load_checkpoint(best)
    assert ckpt["config"]["attention"] == "hard" and ckpt["config"]["hard_inference"] == "argmax"
    assert ckpt["hard_baseline"]["value"] < 0  # a mean log-likelihood
    train.main(args[:3] + ["2"] + args[4:] + ["--resume", os.path.join(out, "last.pt")])
    assert load_checkpoint(os.path.join(out, "last.pt"))["epoch"] == 1
    report = evaluation.evaluate(best, prepared[0], split="VAL", beam_sizes=[1, 3], out=str(tmp_path / "e.json"),
                                 workers=0)
    assert {r["beam_size"] for r in report["results"]} == {1, 3}
    images = os.path.join(os.path.dirname(prepared[0]), "raw", "imgs")
    first = sorted(os.listdir(images))[0]
    figure = str(tmp_path / "fig.png")
    assert caption.main(["--checkpoint", best, "--img", os.path.join(images, first), "--out", figure]) == 0
    assert os.path.getsize(figure) > 0
    assert json.load(open(tmp_path / "e.json"))["results"][0]["captions"]
