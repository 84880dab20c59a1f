import pytest
import torch

import specvlm as sv
from specvlm.pruning import METHOD_NAMES, SCORED_METHODS


def attention_like(n, seed):
    """Skewed, positive, tie-free scores (a few tokens hold most of the mass)."""
    scores = torch.randn(n, generator=torch.Generator().manual_seed(seed)).mul(2).exp()
    assert scores.unique().numel() == n, "ties would leave the reference's unstable sort order open"
    return scores


# --- an independent, literal loop-based re-implementation of the reference's selection ---

def reference_stage1_count(score_list, mass):
    """The reference's token count: a list round-tripped to a float32 tensor, summed one by one."""
    as_tensor = torch.tensor(score_list)
    descending, _ = torch.sort(as_tensor, descending=True)
    target = as_tensor.sum() * mass
    running, count = 0.0, 0
    for score in descending:
        running += score
        count += 1
        if running >= target:
            break
    return count


def reference_specvlm(score_list, ratio, mass):
    """(kept indices, Stage I count) as the reference's two-stage rule computes them."""
    n = len(score_list)
    budget = int(n * (1 - ratio))
    stage1 = min(reference_stage1_count(score_list, mass), budget)
    _, ranked = torch.sort(torch.tensor(score_list), descending=True)
    top = ranked[:stage1]
    is_free = torch.ones(n, dtype=torch.bool)
    is_free[top] = False
    free = torch.where(is_free)[0]
    spread = free[torch.linspace(0, len(free) - 1, budget - stage1, dtype=torch.long)]
    return torch.sort(torch.cat([top, spread]))[0], stage1


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("mass", [0.1, 0.4, 0.9, 1.0])
def test_specvlm_matches_reference(ratio, mass):
    for seed in range(25):
        n = int(torch.randint(1, 1500, (1,), generator=torch.Generator().manual_seed(1000 + seed)))
        scores = attention_like(n, seed)
        expected, stage1 = reference_specvlm(scores.tolist(), ratio, mass)
        kept, stage = sv.keep_specvlm(scores, ratio, mass=mass, return_stage=True)
        assert torch.equal(kept, expected), (seed, n)
        assert int((stage == 1).sum()) == stage1, (seed, n)


def test_reference_rounding_case_is_exercised():
    """With mass=1.0 the float32 running sum often never reaches the total: Stage I takes all."""
    never = [seed for seed in range(40) if reference_stage1_count(attention_like(300, seed).tolist(), 1.0) == 300]
    assert never
    for seed in never:
        _, stage = sv.keep_specvlm(attention_like(300, seed), 0.0, mass=1.0, return_stage=True)
        assert (stage == 1).all()


# --- hand-worked cases ---

HAND = torch.tensor([0.02, 0.30, 0.05, 0.01, 0.20, 0.04, 0.08, 0.15, 0.03, 0.12])  # sums to 1


@pytest.mark.parametrize("scores,ratio,mass,kept,stage", [
    # keep 5. Stage I: .30 (1) + .20 (4) = .50 >= .4. Free: [0 2 3 5 6 7 8 9];
    # linspace(0, 7, 3) = [0, 3.5, 7] -> positions [0 3 7] -> indices 0, 5, 9
    (HAND, 0.5, 0.4, [0, 1, 4, 5, 9], [2, 1, 1, 2, 2]),
    # Stage I: .30 >= .1 alone. Free: [0 2 3 4 5 6 7 8 9]; linspace(0, 8, 4) -> [0 2 5 8] -> 0, 3, 6, 9
    (HAND, 0.5, 0.1, [0, 1, 3, 6, 9], [2, 1, 2, 2, 2]),
    # keep int(10 * 0.19999999999999996) = 1: Stage I wants 2 tokens, capped at 1
    (HAND, 0.8, 0.4, [1], [1]),
    (HAND, 0.9, 0.4, [], []),  # keep int(0.9999999999999998) = 0
    # all zero: target 0 is reached by the first token (at least one), index 0 (stable order)
    (torch.zeros(4), 0.5, 0.4, [0, 1], [1, 2]),
    # float32: 1 + 2**-25 == 1, so the running sum reaches the total at the first token
    (torch.tensor([1.0] + [2.0**-25] * 4), 0.0, 1.0, [0, 1, 2, 3, 4], [1, 2, 2, 2, 2]),
    # float32: .15 + .1 + .1 = .34999999 < .35000002 = the sum: never reached, Stage I takes all
    (torch.tensor([0.0, 0.1, 0.1, 0.15]), 0.0, 1.0, [0, 1, 2, 3], [1, 1, 1, 1]),
])
def test_specvlm_hand_worked(scores, ratio, mass, kept, stage):
    got_kept, got_stage = sv.keep_specvlm(scores, ratio, mass=mass, return_stage=True)
    assert got_kept.tolist() == kept
    assert got_stage.tolist() == stage
    assert torch.equal(sv.keep_specvlm(scores, ratio, mass=mass), got_kept)


def test_docstring_examples():
    assert sv.keep_uniform(10, 0.5).tolist() == [0, 2, 4, 6, 9]
    assert sv.keep_window(10, 0.7, "middle").tolist() == [3, 4, 5]
    assert sv.keep_top(torch.tensor([0.1, 0.5, 0.2, 0.9]), 0.5).tolist() == [1, 3]
    assert sv.keep_random(10, 0.5, torch.Generator().manual_seed(0)).tolist() == [1, 3, 4, 5, 7]
    assert sv.select("window-back", 8, ratio=0.5).tolist() == [4, 5, 6, 7]


# --- budgets and invariants for every method ---

@pytest.mark.parametrize("n,ratio,keep", [
    (0, 0.5, 0), (1, 0.0, 1), (1, 0.5, 0), (10, 0.0, 10), (10, 0.5, 5), (10, 0.7, 3), (10, 0.9, 0),
    (100, 0.9, 9), (120, 0.75, 30), (196, 0.95, 9), (3136, 0.9, 313), (3136, 0.99, 31),
])
def test_keep_budget(n, ratio, keep):
    assert sv.keep_budget(n, ratio) == keep


def test_keep_budget_keeps_the_references_float_rounding():
    """The reference computes int(n * (1 - drop_rate)) in floating point, and 1 - 0.9 is just under 0.1:
    a multiple of 10 keeps one token fewer than a tenth. The budget follows it, so MATs compare."""
    assert sv.keep_budget(100, 0.9) == 9 and sv.keep_budget(10, 0.9) == 0 and sv.keep_budget(1025, 0.9) == 102
    assert sv.keep_budget(100, 0.5) == 50 and sv.keep_budget(100, 0.75) == 25 and sv.keep_budget(100, 0.95) == 5


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 100, 1000])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9, 0.95, 0.99])
def test_invariants(method, n, ratio):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
    kept = sv.select(method, n, ratio=ratio, scores=scores, generator=torch.Generator().manual_seed(0))
    assert kept.dtype == torch.long and kept.ndim == 1
    assert len(kept) == sv.keep_budget(n, ratio)
    assert (kept.diff() > 0).all()  # sorted and unique
    assert len(kept) == 0 or (0 <= kept.min() and kept.max() < n)
    if ratio == 0:
        assert torch.equal(kept, torch.arange(n))


@pytest.mark.parametrize("ratio", [0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_top_takes_the_highest_scores(ratio, dtype):
    scores = attention_like(500, 3).to(dtype)
    kept = sv.keep_top(scores, ratio)
    expected = scores.float().topk(sv.keep_budget(500, ratio)).values
    assert torch.equal(scores.float()[kept].sort(descending=True).values, expected)


def test_top_breaks_ties_by_lower_index():
    assert sv.keep_top(torch.ones(6), 0.5).tolist() == [0, 1, 2]


def test_windows():
    assert sv.keep_window(10, 0.5, "front").tolist() == [0, 1, 2, 3, 4]
    assert sv.keep_window(10, 0.5, "middle").tolist() == [2, 3, 4, 5, 6]
    assert sv.keep_window(10, 0.5, "back").tolist() == [5, 6, 7, 8, 9]


def test_random_is_reproducible_and_seeded():
    def draw(seed):
        return sv.select("random", 1000, ratio=0.5, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_select_passes_options_and_infers_n():
    scores = attention_like(200, 4)
    assert torch.equal(sv.select("specvlm", ratio=0.9, scores=scores, mass=0.9),
                       sv.keep_specvlm(scores, 0.9, mass=0.9))
    assert torch.equal(sv.select("uniform", ratio=0.5, scores=scores), sv.keep_uniform(200, 0.5))


# --- errors ---

@pytest.mark.parametrize("n,ratio,match", [
    (-1, 0.5, r"n \(number of video tokens\) must be an int >= 0, got -1"),
    (2.5, 0.5, "must be an int >= 0, got 2.5"),
    (True, 0.5, "must be an int >= 0, got True"),
    (10, 1.0, r"ratio .* must be a float in \[0, 1\), got 1.0"),
    (10, -0.1, r"in \[0, 1\), got -0.1"),
    (10, "0.5", r"in \[0, 1\), got '0.5'"),
    (10, True, r"in \[0, 1\), got True"),
])
def test_budget_errors(n, ratio, match):
    with pytest.raises(ValueError, match=match):
        sv.keep_budget(n, ratio)


def test_window_error():
    with pytest.raises(ValueError, match=r"unknown window 'side'; choose one of \('front', 'middle', 'back'\)"):
        sv.keep_window(10, 0.5, "side")


@pytest.mark.parametrize("mass", [0, 0.0, -0.4, 1.5, True])
def test_mass_errors(mass):
    with pytest.raises(ValueError, match=r"mass .* must be in \(0, 1\]"):
        sv.keep_specvlm(torch.rand(10), 0.5, mass=mass)


@pytest.mark.parametrize("method", SCORED_METHODS)
@pytest.mark.parametrize("scores,match", [
    (torch.rand(2, 5), r"1-D float tensor .* got \(2, 5\)"),
    (torch.arange(5), r"1-D float tensor .* got \(5,\)"),
    ([0.1, 0.2], "1-D float tensor .* got list"),
    (torch.tensor([0.1, float("nan"), 0.2]), "finite; 1 are NaN or inf"),
    (torch.tensor([float("inf"), float("-inf")]), "finite; 2 are NaN or inf"),
])
def test_score_errors(method, scores, match):
    with pytest.raises(ValueError, match=match):
        sv.select(method, ratio=0.5, scores=scores)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="best", n=10), r"unknown selection method 'best'; choose one of \('random', 'uniform'"),
    (dict(method="top", n=10), "method 'top' ranks video tokens by the target's attention: pass scores"),
    (dict(method="specvlm", n=10), "method 'specvlm' .* pass scores"),
    (dict(method="uniform"), "needs n, the number of video tokens"),
    (dict(method="specvlm", n=120, scores=torch.rand(100)), "scores has 100 entries but the prompt has 120 video tokens"),
    (dict(method="uniform", n=120, scores=torch.rand(100)), "scores has 100 entries but the prompt has 120"),
])
def test_select_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sv.select(ratio=0.5, **kwargs)
