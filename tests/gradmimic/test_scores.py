"""Score and weight definitions: limits, invariances, and the errors users see."""

import pytest
import torch

from gradmimic import Weighting, batch_weights, global_softmax, mimic_scores


def test_proj_and_cos_definitions():
    dots = torch.tensor([2.0, -1.0, 0.0])
    gn = torch.tensor([4.0, 1.0, 3.0])
    assert torch.allclose(mimic_scores(dots, 2.0, "proj"), torch.tensor([-1.0, 0.5, 0.0]))
    assert torch.allclose(mimic_scores(dots, 2.0, "cos", gn), torch.tensor([-0.25, 0.5, 0.0]))


def test_zero_task_vector_gives_zero_scores_and_uniform_weights():
    dots = torch.zeros(4)
    s = mimic_scores(dots, 0.0, "normed_cos", torch.zeros(4))
    assert torch.equal(s, torch.zeros(4))
    assert torch.allclose(batch_weights(s, "normed_cos", 0.3), torch.full((4,), 0.25))


def test_temperature_limits():
    s = torch.tensor([0.3, -1.2, 2.0, 0.1])
    hot = global_softmax(s, 1e6)
    assert torch.allclose(hot, torch.full((4,), 0.25), atol=1e-5)
    cold = global_softmax(s, 1e-4)
    assert torch.allclose(cold, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.isclose(global_softmax(s, 0.7).sum(), torch.tensor(1.0))


def test_scale_behaviour():
    g = torch.Generator().manual_seed(0)
    dots, gn = torch.randn(6, generator=g), torch.rand(6, generator=g) + 1
    # scaling every gradient by c scales proj by c, leaves cos unchanged; scaling T changes neither
    assert torch.allclose(mimic_scores(3 * dots, 2.0, "proj"), 3 * mimic_scores(dots, 2.0, "proj"))
    assert torch.allclose(mimic_scores(3 * dots, 2.0, "cos", 3 * gn), mimic_scores(dots, 2.0, "cos", gn))
    assert torch.allclose(mimic_scores(5 * dots, 10.0, "proj"), mimic_scores(dots, 2.0, "proj"))


def test_raw_methods_only_observe():
    s = torch.tensor([5.0, -5.0])
    assert torch.equal(batch_weights(s, "proj", 1.0), torch.tensor([0.5, 0.5]))


def test_global_softmax_over_ranks_equals_single_process():
    full = torch.randn(7)
    parts = [full[:3], full[3:]]  # ranks with different batch sizes

    def gather_for(rank):
        def gather(t):
            if t.dtype == torch.float64 and t.numel() == 1:  # the size exchange
                return torch.tensor([float(p.numel()) for p in parts], dtype=torch.float64)
            return torch.cat([t if r == rank else p for r, p in enumerate(parts)])
        return gather

    got = torch.cat([global_softmax(parts[r], 0.5, gather_for(r), r) for r in range(2)])
    assert torch.allclose(got, torch.softmax(full / 0.5, 0))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mimic_scores(torch.zeros(2), 1.0, "sharpe"), "unknown mimic method 'sharpe'"),
        (lambda: mimic_scores(torch.zeros(2), 1.0, "cos"), "needs per-sample gradient norms"),
        (lambda: mimic_scores(torch.zeros(2), 1.0, "cos", torch.ones(3)), "gnorms_B has shape (3,)"),
        (lambda: global_softmax(torch.zeros(2), 0.0), "temperature must be > 0"),
        (lambda: global_softmax(torch.zeros(2, 2), 1.0), "scores must be 1-D"),
        (lambda: Weighting("loss"), "unknown weighting rule 'loss'"),
        (lambda: Weighting("mimic", "proj", -1.0), "temperature must be > 0"),
    ],
)
def test_errors_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_a_non_finite_score_propagates_instead_of_failing_the_gather_check():
    """NaN != NaN: the check that a rank's scores sit at its place in the gathered batch must not mistake a NaN
    score for a misplaced rank (the training loop then skips the step)."""
    scores = torch.tensor([0.5, float("nan"), -1.0])
    other = torch.tensor([2.0, 1.0])
    w = global_softmax(scores, 1.0, gather=lambda t: torch.cat([other, t]), rank=1, sizes=[2, 3])
    assert w.shape == (3,) and torch.isnan(w).all()
    with pytest.raises(ValueError, match="place in the gather order"):  # a real misplacement is still caught
        global_softmax(scores, 1.0, gather=lambda t: torch.cat([t, other]), rank=1, sizes=[2, 3])
