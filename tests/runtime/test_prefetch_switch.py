"""The decode switch that turns preloading on and off by measured token time
(runtime/prefetch.py DecodeSwitch), driven with synthetic clocks."""

from __future__ import annotations

from edgemoe.runtime.prefetch import (SWITCH_EARLY, SWITCH_MAX_RUN, SWITCH_PAIRS, SWITCH_RUN, DecodeSwitch,
                                      PrefetchConfig)


def drive(switch: DecodeSwitch, tokens: int, cost, t: float = 0.0) -> tuple[list[bool], float]:
    """Run `tokens` decode tokens; a token in state s takes cost(s, i) seconds."""
    states = []
    for i in range(tokens):
        s = switch.decode(t)
        states.append(s)
        t += cost(s, i)
    return states, t


def test_alternates_then_keeps_preloading_that_pays():
    sw = DecodeSwitch()
    states, _ = drive(sw, 2 * SWITCH_EARLY + 1 + SWITCH_RUN, lambda s, i: 0.009 if s else 0.010)
    assert states[: 2 * SWITCH_EARLY] == [True, False] * SWITCH_EARLY  # the comparison, pair by pair
    assert sw.choice is True and all(states[2 * SWITCH_EARLY + 1 :])  # one-sided: decided early, on
    assert sw.medians_ms == {True: 9.0, False: 10.0}


def test_turns_preloading_off_where_it_costs_and_backs_off():
    sw = DecodeSwitch()
    slower = lambda s, i: 0.011 if s else 0.010  # noqa: E731
    seen, t = drive(sw, 2 * SWITCH_EARLY, slower)  # the comparison's pairs
    states, t = drive(sw, SWITCH_RUN, slower, t)  # decided at the first of these: a run without
    assert sw.choice is False and sw.run == SWITCH_RUN and not any(states)
    seen += states
    # Each later comparison chooses "off" again: the run doubles, up to its maximum.
    for run in (2 * SWITCH_RUN, 4 * SWITCH_RUN):
        states, t = drive(sw, 2 * SWITCH_EARLY + run, slower, t)
        assert sw.run == min(run, SWITCH_MAX_RUN)
        assert states[: 2 * SWITCH_EARLY] == [True, False] * SWITCH_EARLY and not any(states[2 * SWITCH_EARLY :])
        seen += states
    assert sw.comparisons == 3 and (sw.on_tokens, sw.off_tokens) == (sum(seen), len(seen) - sum(seen))


def test_a_saving_under_the_margin_is_not_worth_preloading():
    # 1 % faster with preloading, noisy both ways: the full comparison runs and says off.
    sw = DecodeSwitch()
    drive(sw, 2 * SWITCH_PAIRS + 1, lambda s, i: (0.0099 if s else 0.010) + (0.002 if i % 4 < 2 else 0))
    assert sw.comparisons == 1 and sw.choice is False


def test_other_forwards_are_no_samples():
    sw = DecodeSwitch()
    t = 0.0
    for _ in range(SWITCH_PAIRS * 3):
        sw.decode(t)
        sw.other()  # a prefill after every decode token: no interval is a sample
        t += 1.0
    assert sw.pairs == [] and sw.comparisons == 0 and sw.exploring


def test_only_the_automatic_setting_is_switched():
    assert PrefetchConfig().switched
    assert not PrefetchConfig(threshold=0.3).switched and not PrefetchConfig(pacing=False).switched
