"""models.py: shapes, attention, gradients, the encoders' weights."""
import urllib.error

import pytest
import torch

import train
from models import Attention, DecoderWithAttention, Encoder, WeightsUnavailable


def _decoder(encoder_dim=24, vocab=14, dropout=0.0):
    return DecoderWithAttention(attention_dim=16, embed_dim=12, decoder_dim=20, vocab_size=vocab,
                                encoder_dim=encoder_dim, dropout=dropout)


def test_encoder_shapes():
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert Encoder("efficientnet_lite0", 0, pretrained=False)(images).shape == (2, 4, 1280)  # 64 / 32 = 2 x 2
    assert Encoder("efficientnet_lite0", 3, pretrained=False)(images).shape == (2, 9, 1280)
    assert Encoder("resnet50", 14, pretrained=False)(images).shape == (2, 196, 2048)  # the paper's 14 x 14 x 2048


def test_lite0_ships_imagenet_weights():
    pretrained = Encoder("efficientnet_lite0", 0, pretrained=True)
    random = Encoder("efficientnet_lite0", 0, pretrained=False)
    p = dict(pretrained.named_parameters())
    r = dict(random.named_parameters())
    name = "backbone.net._conv_stem.weight"
    assert not torch.equal(p[name], r[name])


def test_attention_shapes_and_weights_sum_to_one():
    attention = Attention(encoder_dim=24, decoder_dim=20, attention_dim=16)
    features, h = torch.randn(3, 49, 24), torch.randn(3, 20)
    context, alpha = attention(features, attention.project_features(features), h)
    assert context.shape == (3, 24) and alpha.shape == (3, 49)
    assert torch.allclose(alpha.sum(dim=1), torch.ones(3), atol=1e-6)
    assert (alpha >= 0).all()
    # the context is the alpha-weighted mean of the features
    assert torch.allclose(context, (alpha.unsqueeze(2) * features).sum(1), atol=1e-5)


def test_attention_with_several_beams_per_picture_equals_repeating_the_picture():
    attention = Attention(encoder_dim=24, decoder_dim=20, attention_dim=16)
    features, h = torch.randn(3, 49, 24), torch.randn(3 * 4, 20)  # 4 hypotheses per picture, adjacent rows
    context, alpha = attention(features, attention.project_features(features), h)
    repeated = features.repeat_interleave(4, dim=0)  # (12, 49, 24): what beam search no longer builds
    one_each = [attention(repeated[r : r + 1], attention.project_features(repeated[r : r + 1]), h[r : r + 1])
                for r in range(12)]
    assert context.shape == (12, 24) and alpha.shape == (12, 49)
    assert torch.allclose(context, torch.cat([c for c, _ in one_each]), atol=1e-5)
    assert torch.allclose(alpha, torch.cat([a for _, a in one_each]), atol=1e-6)


def test_decoder_forward_shapes_and_sorting():
    decoder = _decoder()
    features = torch.randn(4, 9, 24)
    captions = torch.randint(1, 11, (4, 8))
    caplens = torch.tensor([[5], [8], [3], [6]])
    scores, caps_sorted, decode_lengths, alphas, sort_ind = decoder(features, captions, caplens)
    assert scores.shape == (4, 7, decoder.vocab_size) and alphas.shape == (4, 7, 9)
    assert decode_lengths.tolist() == [7, 5, 4, 2] and sort_ind.tolist() == [1, 3, 0, 2]
    assert torch.equal(caps_sorted, captions[sort_ind])
    # finished captions are not computed: their later steps stay zero
    assert alphas[3, 2:].abs().sum() == 0
    assert torch.allclose(alphas[0].sum(1), torch.ones(7), atol=1e-5)


def test_feature_dropout_drops_features_in_training_only():
    """The steps see features zeroed at rate p and the rest scaled by 1 / (1 - p); in eval mode, the features as given."""
    torch.manual_seed(0)
    decoder = DecoderWithAttention(attention_dim=16, embed_dim=12, decoder_dim=20, vocab_size=14, encoder_dim=24,
                                   dropout=0.0, feature_dropout=0.4)
    features = torch.rand(4, 9, 24) + 0.1  # (batch, num_pixels, encoder_dim), no zeros of its own
    captions, caplens = torch.randint(1, 11, (4, 8)), torch.tensor([8, 6, 5, 3])
    seen, step = [], decoder.step
    decoder.step = lambda embedded, h, c, feats, projected: (seen.append(feats), step(embedded, h, c, feats, projected))[1]
    decoder.train()
    decoder(features, captions, caplens)
    kept = seen[0] != 0  # (batch, num_pixels, encoder_dim); rows are in the length order, here the given one
    assert 0.3 < 1 - kept.float().mean().item() < 0.5
    assert torch.allclose(seen[0][kept], features[kept] / 0.6)
    seen.clear()
    decoder.eval()
    decoder(features, captions, caplens)
    assert torch.equal(seen[0], features)


def test_gradients_reach_trainable_parameters_only():
    torch.manual_seed(0)
    encoder = Encoder("efficientnet_lite0", 0, pretrained=False)
    # Lite's stochastic depth (drop-connect) skips a whole block for a sample at random; with two
    # samples it skips one for both about one run in eight, and that block rightly gets no gradient
    net = encoder.backbone.net
    net._global_params = net._global_params._replace(drop_connect_rate=0.0)
    decoder = _decoder(encoder_dim=1280)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    captions = torch.tensor([[12, 1, 2, 3, 13], [12, 4, 5, 13, 0]])
    caplens = torch.tensor([5, 4])
    for fine_tune in (False, True):
        encoder.fine_tune(fine_tune)
        encoder.zero_grad(set_to_none=True)
        decoder.zero_grad(set_to_none=True)
        loss, _, _ = train.compute_loss(encoder, decoder, images, captions, caplens, cached=False, alpha_c=1.0)
        loss.backward()
        for name, p in list(decoder.named_parameters()) + list(encoder.named_parameters()):
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name
        trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
        if fine_tune:
            assert trainable and "backbone.net._conv_stem.weight" not in trainable  # early layers stay frozen
            assert "backbone.net._conv_head.weight" in trainable
        else:
            assert trainable == []


def test_offline_imagenet_weights_give_one_line_and_exit_2(prepared, tmp_path, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights either
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(WeightsUnavailable) as err:
        Encoder("resnet50", 14, pretrained=True)
    message = str(err.value)
    for way_out in ("--encoder efficientnet_lite0", "TORCH_HOME", "--encoder-weights PATH", "--no-pretrained"):
        assert way_out in message
    assert "\n" not in message

    with pytest.raises(SystemExit) as exit_info:
        train.run_cli(lambda: train.main(["--data-folder", prepared[0], "--encoder", "resnet50",
                                          "--epochs", "1", "--out-dir", str(tmp_path / "o")]))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("error: cannot get ImageNet weights for resnet50")


def test_encoder_weights_file_is_used(tmp_path):
    import torchvision

    reference = torchvision.models.resnet50(weights=None)
    path = tmp_path / "r50.pth"
    torch.save(reference.state_dict(), path)
    encoder = Encoder("resnet50", 14, pretrained=True, weights_path=str(path))
    assert torch.equal(encoder.backbone[0].weight, reference.conv1.weight)
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(WeightsUnavailable, match="cannot read encoder weights"):
        Encoder("resnet50", 14, pretrained=True, weights_path=str(tmp_path / "junk.pth"))
