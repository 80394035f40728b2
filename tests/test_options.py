"""The option schemas: every field described once, and that description is what `--help` and
the docs' option reference show; each task's run config has exactly its own group's options."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftkit.cli import app
from peftkit.errors import PeftkitError
from peftkit.flags import option_fields, option_reference, schema_groups
from peftkit.options import CommonOptions, SftOptions, config_class
from peftkit.resolve import make_config
from peftkit.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
# options of a command that share a run option's name but mean something else there
OWN_MEANING = {"strategies": {"model", "task"}, "merge": {"dtype", "overwrite"}, "generate": {"max_new_tokens"}}


def words(text: str) -> str:
    return " ".join(text.split())


def test_every_option_of_every_group_has_a_description():
    for label, fields in schema_groups():
        for name, field in fields.items():
            assert field.description and len(field.description) > 10, f"{label or 'common'}.{name} has no description"


def test_every_description_shows_in_train_help():
    result = CliRunner().invoke(app, ["train", "--help"], terminal_width=1000)
    assert result.exit_code == 0, result.output
    shown = words(result.output)
    for name, (label, field) in option_fields().items():
        assert words(field.description) in shown, name
        assert f"--{name.replace('_', '-')}" in shown or name in ("learning_rate", "text_columns"), name


@pytest.mark.parametrize("command, names", [("compare", ["model", "task", "data_dir"]), ("eval", ["data_dir"]),
                                            ("estimate", ["model", "strategy", "batch_size", "optimizer", "select"])])
def test_other_commands_show_the_same_descriptions(command, names):
    shown = words(CliRunner().invoke(app, [command, "--help"], terminal_width=1000).output)
    fields = option_fields()
    for name in names:
        assert words(fields[name][1].description) in shown, (command, name)


def test_cli_declares_no_run_option_by_hand():
    """Every run option a command takes comes from the schema (`with_options`); a parameter
    of cli.py that is a typer.Option named like a run option must mean something else."""
    tree = ast.parse((REPO / "peftkit" / "cli.py").read_text())
    run_options = set(option_fields())
    copies = []
    for function in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        arguments = function.args.args + function.args.kwonlyargs
        defaults = function.args.defaults + function.args.kw_defaults
        for argument, default in zip(arguments[len(arguments) - len(defaults):], defaults):
            is_option = isinstance(default, ast.Call) and ast.unparse(default.func) == "typer.Option"
            if is_option and argument.arg in run_options and argument.arg not in OWN_MEANING.get(function.name, set()):
                copies.append(f"{function.name}: {argument.arg}")
    assert not copies, copies


def test_the_option_reference_in_the_docs_is_generated_from_the_schema():
    assert (REPO / "docs" / "reference" / "options.md").read_text() == option_reference(), \
        "regenerate it: python -m peftkit.flags > docs/reference/options.md"


def test_a_run_config_has_exactly_the_common_and_its_tasks_options():
    config = make_config({"model": "tiny-llama", "task": "dolly"})
    assert set(type(config).model_fields) == {*CommonOptions.model_fields, *SftOptions.model_fields}
    assert not hasattr(config, "text_columns") and config.max_new_tokens == 64
    assert type(config) is config_class(TASKS["sft"].options)
    assert "max_new_tokens" not in make_config({"model": "tiny-bert"}).model_dump()


def test_an_unknown_key_names_the_groups_of_its_task_and_the_closest_key():
    with pytest.raises(PeftkitError) as err:
        make_config({"model": "tiny-llama", "task": "dolly", "packin": True})
    message = str(err.value)
    assert message.startswith("unknown option 'packin' (did you mean 'packing'?)")
    assert "the common options" in message and re.search(r"task sft's \(.*packing.*\)", message)
    assert re.search(r"strategy lora's \(r, alpha", message)


def test_another_tasks_option_is_refused_when_set_and_dropped_at_its_default():
    """An old record or recipe carries every task's columns, unset: those are not this run's."""
    with pytest.raises(PeftkitError, match="packing is an option of task 'sft'"):
        make_config({"model": "tiny-bert", "task": "sst2", "packing": True})
    assert make_config({"model": "tiny-bert", "task": "sst2", "packing": False, "tokens_column": None,
                        "max_new_tokens": 64}).task_kind is TASKS["classification"]


def test_a_bad_value_names_the_option_and_what_it_means():
    with pytest.raises(PeftkitError, match=r"option 'batch_size': .*greater than or equal to 1 \(batch_size: "
                                           r"Examples per optimizer micro-step\)"):
        make_config({"model": "tiny-bert", "batch_size": 0})
