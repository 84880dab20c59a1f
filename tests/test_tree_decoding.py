"""Tree drafting: one target pass over a static tree, still exactly the target's greedy output."""

import pytest

import specvlm as sv
from specvlm.trees import MC_SIM_7B_63, Tree, chain

SMALL_TREE = Tree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])


@pytest.fixture(scope="module", params=["tiny_pair", "self_pair", "noisy_pair"])
def pair(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("clip,frames", [("bigbuckbunny", 1), ("bikes", 5), ("carphone_pristine", 16)])
@pytest.mark.parametrize("tree", [MC_SIM_7B_63, SMALL_TREE, chain(3)], ids=["mc_sim_7b_63", "small", "chain3"])
def test_tree_decoding_equals_greedy(pair, clip, frames, tree):
    video = sv.sample_video(clip, frames)
    reference = sv.generate(pair, video, method="ar", max_new_tokens=24).tokens
    for method in ("sd",) + tuple(sv.pruning.METHODS):
        for ratio in (0.0, 0.5, 0.9, 0.99) if method != "sd" else (0.0,):
            result = sv.generate(pair, video, method=method, ratio=ratio, tree=tree, max_new_tokens=24)
            assert result.tokens == reference, (pair.name, clip, method, ratio)


@pytest.mark.parametrize("max_new_tokens", [1, 3, 6, 11])
def test_tree_never_overshoots(self_pair, max_new_tokens):
    video = sv.sample_video("bikes", 3)
    reference = sv.generate(self_pair, video, method="ar", max_new_tokens=max_new_tokens).tokens
    result = sv.generate(self_pair, video, method="sd", tree=MC_SIM_7B_63, max_new_tokens=max_new_tokens)
    assert result.tokens == reference and len(result.tokens) <= max_new_tokens


def test_self_speculation_with_a_tree_accepts_whole_paths(self_pair):
    video = sv.sample_video("bikes", 3)
    result = sv.generate(self_pair, video, method="sd", tree=MC_SIM_7B_63, max_new_tokens=40)
    assert all(n == MC_SIM_7B_63.depth for n in result.accepted[:-1])


def test_the_25_node_tree_accepts_at_least_as_much_as_a_chain_of_its_depth(noisy_pair):
    tree_total = chain_total = 0.0
    for clip in ("bigbuckbunny", "bikes", "carphone_pristine"):
        for ratio in (0.0, 0.9):
            video = sv.sample_video(clip, 4)
            method = "sd" if ratio == 0 else "specvlm"
            tree_total += sv.generate(noisy_pair, video, method=method, ratio=ratio, tree=MC_SIM_7B_63,
                                      max_new_tokens=40).mean_accepted
            chain_total += sv.generate(noisy_pair, video, method=method, ratio=ratio, k=MC_SIM_7B_63.depth,
                                       max_new_tokens=40).mean_accepted
    assert tree_total >= chain_total > 0
