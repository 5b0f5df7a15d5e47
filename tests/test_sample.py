import pytest
import torch

from edgemoe.errors import InvalidArgument
from edgemoe.sample import make_logits_processors, make_repetition_penalty, make_sampler


def test_greedy_picks_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert make_sampler(0.0)(logits) == 1


def test_seed_makes_sampling_reproducible():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    a = [make_sampler(1.0, seed=7)(logits) for _ in range(1)]
    s1, s2 = make_sampler(1.0, seed=7), make_sampler(1.0, seed=7)
    draws1 = [s1(logits) for _ in range(30)]
    draws2 = [s2(logits) for _ in range(30)]
    assert draws1 == draws2 and a[0] == draws1[0]
    assert len(set(draws1)) > 1  # it really samples


def test_top_k_restricts_support():
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    s = make_sampler(10.0, top_k=2, seed=0)
    assert {s(logits) for _ in range(200)} == {0, 1}


def test_top_p_keeps_smallest_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two only
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    s = make_sampler(1.0, top_p=0.7, seed=0)
    assert {s(probs.log()) for _ in range(300)} == {0, 1}
    # top_p tiny still keeps the most likely token
    s = make_sampler(1.0, top_p=1e-6, seed=0)
    assert {s(probs.log()) for _ in range(50)} == {0}


def test_min_p_filters_unlikely_tokens():
    probs = torch.tensor([0.6, 0.35, 0.05])
    s = make_sampler(1.0, min_p=0.2, seed=0)
    assert {s(probs.log()) for _ in range(300)} == {0, 1}


def test_repetition_penalty_matches_transformers_rule():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = make_repetition_penalty(2.0)([0, 1, 1], logits)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # input untouched
    assert make_logits_processors(1.0) == []


def test_repetition_penalty_agrees_with_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(1, 30)
    ids = torch.tensor([[3, 5, 5, 29, 0]])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    ours = make_repetition_penalty(1.3)(ids[0].tolist(), logits[0])
    assert torch.allclose(ref[0], ours)


def test_top_p_agrees_with_hf_support():
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(1)
    for _ in range(20):
        logits = torch.randn(1, 40) * 2
        ref = TopPLogitsWarper(0.8)(None, logits.clone())
        kept = set(torch.nonzero(ref[0] > float("-inf")).flatten().tolist())
        s = make_sampler(1.0, top_p=0.8, seed=0)
        seen = {s(logits[0]) for _ in range(400)}
        assert seen <= kept


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(temperature=1, top_p=0), dict(temperature=1, top_p=1.5),
                                    dict(temperature=1, top_k=-1)])
def test_bad_sampling_arguments_are_rejected(kwargs):
    with pytest.raises(InvalidArgument):
        make_sampler(**kwargs)


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    from edgemoe.sample import PresenceFrequencyPenalty

    proc = PresenceFrequencyPenalty(presence=0.5, frequency=1.0)
    logits = torch.zeros(6)
    assert proc([1, 1, 2], logits).tolist() == [0.0] * 6  # the prompt is not penalized
    out = proc([1, 1, 2, 3, 3, 4], logits)  # generated: 3, 3, 4
    assert out.tolist() == [0.0, 0.0, 0.0, -2.5, -1.5, 0.0]
    with pytest.raises(InvalidArgument):
        PresenceFrequencyPenalty(presence=2.5)
    with pytest.raises(InvalidArgument):
        PresenceFrequencyPenalty(frequency=float("nan"))


def test_logit_bias_adds_and_checks_its_keys():
    from edgemoe.sample import make_logit_bias

    proc = make_logit_bias({"2": 5.0, 0: -100}, vocab_size=4)
    logits = torch.zeros(4)
    assert proc([], logits).tolist() == [-100.0, 0.0, 5.0, 0.0] and logits.tolist() == [0.0] * 4
    for bad in ({"4": 1}, {"x": 1}, {1: 101}, {1: float("inf")}):
        with pytest.raises(InvalidArgument):
            make_logit_bias(bad, vocab_size=4)
    assert len(make_logits_processors(1.0, presence_penalty=0.1, logit_bias={1: 1}, vocab_size=4)) == 2
