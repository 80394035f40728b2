"""GRPO's reward functions (peftkit.rewards): the built-in answer checks and format, your own
functions from a file or a module, NAME:WEIGHT, and every refusal in one line."""

from __future__ import annotations

import math
import sys

import pytest

from peftkit.errors import PeftkitError
from peftkit.rewards import Reward, checked, load_user_function, resolve_rewards, score
from peftkit.tasks.grpo import ANSWER_REWARDS

CHAT = [[{"role": "assistant", "content": "The Positive."}], [{"role": "assistant", "content": "negative"}]]


def rewards(*specs, pattern=None):
    return resolve_rewards(list(specs), pattern, ANSWER_REWARDS)


def values(reward, completions, **columns):
    return reward.function(prompts=[""] * len(completions), completions=completions, **columns)


def test_exact_matches_normalized_text_in_chat_and_plain_completions():
    exact = rewards("exact")[0]
    assert values(exact, CHAT, answer=["positive", "positive"]) == [1.0, 0.0]
    assert values(exact, ["positive!", ""], answer=["Positive", ""]) == [1.0, 0.0]  # an empty reply never matches


def test_gsm8k_compares_the_final_number_as_a_number():
    gsm8k = rewards("gsm8k")[0]
    replies = ["so 3 + 4 = 7\n#### 7.0", "#### 1,000", "the answer is 12", "no number"]
    assert values(gsm8k, replies, answer=["#### 7", "#### 1000", "... #### 12", "#### 5"]) == [1.0, 1.0, 1.0, 0.0]


def test_format_fullmatches_its_pattern_across_lines():
    fmt = rewards("format", pattern=r"<think>.*</think>\s*\w+")[0]
    assert values(fmt, ["<think>a\nb</think> positive", "positive <think></think>"], answer=["", ""]) == [1.0, 0.0]


def test_weights_and_the_weighted_total():
    found = rewards("exact:0.5", "format:-2", pattern=r"\w+")
    assert [(r.name, r.weight) for r in found] == [("exact", 0.5), ("format", -2.0)]
    each, totals = score(found, ["", ""], CHAT, {"answer": ["negative", "negative"]})
    assert each == {"exact": [0.0, 1.0], "format": [0.0, 1.0]}
    assert totals == [0.0, 0.5 - 2.0]


def test_a_none_reward_is_left_out_of_the_total():
    def partial(prompts, completions, **columns):
        return [None, 1.0]

    found = [*rewards("exact"), Reward("partial", 2.0, checked("partial", partial))]
    each, totals = score(found, ["", ""], CHAT, {"answer": ["positive", "x"]})
    assert math.isnan(each["partial"][0]) and totals == [1.0, 2.0]


def test_your_own_function_from_a_file_and_from_a_module(tmp_path, monkeypatch):
    source = "def length(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n"
    (tmp_path / "my_rewards.py").write_text(source)
    by_path = rewards(f"{tmp_path / 'my_rewards.py'}:length:0.25")[0]
    assert (by_path.name, by_path.weight) == ("length", 0.25)
    assert values(by_path, ["abc", ""], answer=["", ""]) == [3.0, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = rewards("my_rewards:length")[0]
    assert (by_module.name, by_module.weight) == ("length", 1.0)
    assert values(by_module, ["ab"], answer=[""]) == [2.0]
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize(("specs", "pattern", "expected"), [
    (["exat"], None, "unknown reward 'exat' (did you mean 'exact'?)"),
    (["exact:heavy"], None, "the weight 'heavy' is not a finite number"),
    (["exact:inf"], None, "the weight 'inf' is not a finite number"),
    (["exact:1:2"], None, "write a built-in reward as NAME or NAME:WEIGHT"),
    (["a:b:c:d"], None, "write your own function as module:function"),
    (["format"], None, "the format reward needs the regex"),
    (["format"], "(unclosed", "is not a regular expression"),
    (["exact"], r"\w+", "format_pattern is set but no reward is 'format'"),
    (["exact", "exact:2"], None, "rewards name 'exact' twice"),
    ([], None, "rewards is empty"),
    (["no_such_module_here:f"], None, "cannot import no_such_module_here (ModuleNotFoundError"),
    (["/nowhere/r.py:f"], None, "reward file /nowhere/r.py does not exist"),
])
def test_bad_reward_specs_are_refused_in_one_line(specs, pattern, expected):
    with pytest.raises(PeftkitError) as err:
        resolve_rewards(specs, pattern, ANSWER_REWARDS)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_user_file_that_fails_or_lacks_the_function_is_refused(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_package_at_all\n")
    (tmp_path / "fine.py").write_text("lenght = 3\ndef length(prompts, completions, **kw):\n    return []\n")
    for target, expected in [(f"{tmp_path}/broken.py:f", "cannot import"),
                             (f"{tmp_path}/fine.py:lengt", "has no 'lengt' (did you mean"),
                             (f"{tmp_path}/fine.py:lenght", "'lenght' is a int, not a function")]:
        with pytest.raises(PeftkitError) as err:
            load_user_function(target)
        assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("returned", "expected"), [
    ([1.0], "reward function 'bad' returned 1 values for 2 completions"),
    (3.0, "reward function 'bad' returned a float for 2 completions"),
    ([1.0, "yes"], "reward function 'bad' returned str 'yes'"),
])
def test_a_reward_that_returns_the_wrong_thing_names_itself(returned, expected):
    bad = checked("bad", lambda prompts, completions, **kw: returned)
    with pytest.raises(PeftkitError) as err:
        bad(prompts=["", ""], completions=["a", "b"])
    assert expected in str(err.value)
