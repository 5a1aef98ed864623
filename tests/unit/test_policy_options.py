"""`PolicyConfig.from_options`: the one conversion of user-facing policy options (flags and keywords)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from croupier.errors import ConfigError
from croupier.server.cli.policy_args import add_policy_arguments, policy_from_args
from croupier.server.sampling.policy import PolicyConfig


def flags(*argv: str) -> PolicyConfig:
    p = argparse.ArgumentParser()
    add_policy_arguments(p)
    return policy_from_args(p.parse_args(["--global-batch", "8", *argv]))


@pytest.mark.parametrize(("argv", "options", "expected"), [
    ([], {}, None),
    (["--clip", "3"], {"clip": 3}, PolicyConfig("clusterclip", clip=3)),
    (["--clip", "3"], {"clip": "3"}, PolicyConfig("clusterclip", clip=3)),
    (["--clip", "3"], {"clip": np.int64(3)}, PolicyConfig("clusterclip", clip=3)),
    (["--clip", "auto", "--budget-steps", "50", "--min-active-share", "0.25"],
     {"clip": "auto", "budget_steps": 50, "min_active_share": 0.25},
     PolicyConfig("clusterclip", auto_clip=True, budget_steps=50, min_active_share=0.25)),
    (["--policy", "weighted", "--weights", "1,0,2.5"], {"policy": "weighted", "weights": np.array([1, 0, 2.5])},
     PolicyConfig("weighted", weights=(1.0, 0.0, 2.5))),
    (["--policy", "g2s", "--switch-step", "7", "--on-exhausted", "random"],
     {"policy": "g2s", "switch_step": 7, "on_exhausted": "random"},
     PolicyConfig("g2s", switch_step=7, on_exhausted="random")),
    (["--policy", "s2g", "--switch-fraction", "0.5", "--budget-steps", "10"],
     {"policy": "s2g", "switch_fraction": 0.5, "budget_steps": 10},
     PolicyConfig("s2g", switch_fraction=0.5, budget_steps=10)),
])
def test_flags_and_keywords_give_the_same_config(argv, options, expected) -> None:
    if expected is None:  # no policy and no clip: clusterclip, which needs a clip
        for make in (lambda: flags(*argv), lambda: PolicyConfig.from_options(**options)):
            with pytest.raises(ConfigError, match="policy 'clusterclip' needs a clip threshold"):
                make()
        return
    from_flags, from_keywords = flags(*argv), PolicyConfig.from_options(**options)
    assert from_flags == expected and from_keywords == expected
    assert from_flags.canonical_json() == from_keywords.canonical_json()


@pytest.mark.parametrize(("options", "message"), [
    ({"clip": "lots"}, "clip must be an integer >= 1 or 'auto', got 'lots'"),
    ({"clip": 2.5}, "clip must be an integer >= 1 or 'auto', got 2.5"),
    ({"clip": True}, "clip must be an integer >= 1 or 'auto', got True"),
    ({"clip": 0}, "clip must be an integer >= 1, got 0"),
    ({"clip": "auto"}, "auto clip needs budget_steps"),
    ({"policy": "weighted", "weights": 3}, "weights must be a sequence of numbers (one per cluster), got 3"),
    ({"policy": "bogus"}, "unknown policy 'bogus'"),
])
def test_bad_options_are_refused_in_one_line(options, message) -> None:
    with pytest.raises(ConfigError) as err:
        PolicyConfig.from_options(**options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_command_line_names_its_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--clip must be an integer >= 1 or 'auto', got 'lots'$"):
        flags("--clip", "lots")
