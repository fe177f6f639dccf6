"""Exercise 8 (hard_attention.py): sample_locations, against eqs. (8)-(9) and a chi-square test of the samples."""
import torch

from .common import expect, expect_tensor, expect_tuple, load

CHI2_999_DF5 = 20.515  # the 0.999 quantile of the chi-square distribution with 5 degrees of freedom


def check(folder):
    hard = load(folder, "hard_attention")
    torch.manual_seed(0)
    rows, num_pixels, encoder_dim = 6000, 6, 3
    alpha = torch.tensor([0.35, 0.05, 0.2, 0.1, 0.25, 0.05]).expand(rows, num_pixels).clone().requires_grad_(True)
    features = torch.randn(rows, num_pixels, encoder_dim)  # (rows, num_pixels, encoder_dim)
    expected = torch.randn(rows, encoder_dim)  # (rows, encoder_dim): stands in for sum_i alpha_i a_i

    out = hard.sample_locations(features, alpha, expected, 0.0)
    expect_tuple(out, 2, "context, locations")
    context, locations = out
    expect_tensor("context", context, (rows, encoder_dim), "(rows, encoder_dim)")
    expect_tensor("locations", locations, (rows,), "(rows,)")
    expect(not locations.dtype.is_floating_point, "locations should be integer indices (torch.multinomial gives them)")
    expect(bool((locations >= 0).all()) and bool((locations < num_pixels).all()),
           "with expected_prob 0 every row must sample a location in 0..num_pixels-1")
    picked = features[torch.arange(rows), locations]  # (rows, encoder_dim)
    expect(torch.equal(context.detach(), picked), "the context should be the sampled location's feature vector "
                                                  "(eq. 9), not a weighted sum")
    expect(not context.requires_grad, "no gradient may flow from the sampled context into alpha: a sample is not "
                                      "differentiable (that is what the REINFORCE term is for)")
    counts = torch.bincount(locations, minlength=num_pixels).double()  # (num_pixels,)
    wanted = alpha[0].detach().double() * rows
    chi2 = float(((counts - wanted) ** 2 / wanted).sum())
    expect(chi2 < CHI2_999_DF5, f"the sampled locations do not follow alpha (chi-square {chi2:.1f} over 6 cells; "
                                "use torch.multinomial(alpha, 1))")

    context, locations = hard.sample_locations(features, alpha, expected, 1.0)
    expect(bool((locations == -1).all()), "with expected_prob 1 every row should use the expected context "
                                          "and report location -1")
    expect(torch.equal(context.detach(), expected), "rows that use the expected context must return it unchanged")

    context, locations = hard.sample_locations(features, alpha, expected, 0.5)
    used = locations == -1
    share = float(used.float().mean())
    expect(abs(share - 0.5) < 0.04, f"with expected_prob 0.5 about half the rows should use the expected context; "
                                    f"got {100 * share:.0f} %")
    expect(torch.equal(context.detach()[used], expected[used]), "rows with location -1 must use the expected context")
    kept = ~used
    expect(torch.equal(context.detach()[kept], features[torch.arange(rows), locations.clamp(min=0)][kept]),
           "rows with a location must use that location's feature vector")
