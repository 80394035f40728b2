"""Config robustness: generated recipes (as YAML text), option dicts and `--set` flag lists
either validate or fail with one line (a PeftkitError); never another exception."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftkit.options import RunConfig
from peftkit.recipes import apply_overrides, load_recipe
from peftkit.resolve import make_config
from peftkit.errors import PeftkitError
from peftkit.strategies import STRATEGIES

FIELDS = sorted(RunConfig.model_fields)
STRATEGY_NAMES = sorted(n for n in STRATEGIES if not n.startswith("peft:")) + ["peft:loha", "nope"]
OPTION_NAMES = ["r", "alpha", "dropout", "target_modules", "variant", "reduction_factor", "num_virtual_tokens", "pooling",
                "trainable_layers", "layers", "init", "quant_type", "use_dora", "scaling", "bogus"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["sst2", "conll2003", "squad", "dolly", "seq2seq", "lora",
                                                           "auto", "bf16", "best", "last", "epoch", "tiny-bert"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
strategies_ = st.one_of(st.sampled_from(STRATEGY_NAMES),
                        st.fixed_dictionaries({"name": st.sampled_from(STRATEGY_NAMES)},
                                              optional={k: values for k in OPTION_NAMES}),
                        values)
configs = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), values, max_size=6).flatmap(
    lambda d: st.just(d) | strategies_.map(lambda s: {**d, "strategy": s}))

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def one_line_or_config(build) -> None:
    try:
        assert isinstance(build(), RunConfig)
    except PeftkitError as err:
        message = str(err)
        assert message and "\n" not in message.strip(), message


@FUZZ
@given(configs)
def test_generated_option_dicts_validate_or_fail_in_one_line(values):
    one_line_or_config(lambda: make_config(values))


@FUZZ
@given(configs, st.lists(st.text(max_size=20) | st.sampled_from(["r=16", "epochs=two", "strategy=lora", "strategy.r=x",
                                                                    "lerning_rate=1", "task=conll2003", "=1", "seed"]),
                          max_size=4))
def test_generated_set_flags_validate_or_fail_in_one_line(values, flags):
    one_line_or_config(lambda: make_config(apply_overrides(values, flags)))


@FUZZ
@given(st.one_of(configs.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=80)))
def test_generated_recipe_files_validate_or_fail_in_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(text)
    one_line_or_config(lambda: make_config(load_recipe(path)))
