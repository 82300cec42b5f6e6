"""Each option is declared once (e4tcli.options): the CLI, the recipe keys and the API follow from it."""

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

from e4tcli import api
from e4tcli.cli.app import app
from e4tcli.errors import UsageError
from e4tcli.options import GenerateOptions, PretrainOptions, TuneOptions, flag_names, flag_of
from e4tcli.recipe import recipe_fields

runner = CliRunner()

COMMANDS = {
    "pretrain": (PretrainOptions, {"domain", "config", "num_processes", "json_output"}),
    "tune": (TuneOptions, {"domain", "json_output"}),
    "generate": (GenerateOptions, {"json_output"}),
}


def command_params(name: str) -> dict:
    command = typer.main.get_command(app).commands[name]
    return {param.name: param for param in command.params}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_declared_option_is_one_cli_parameter_with_its_flag_and_help(name):
    options_class, own = COMMANDS[name]
    params = command_params(name)
    declared = {field.name: field for field in dataclasses.fields(options_class)}
    assert set(params) == set(declared) | own
    for field_name, field in declared.items():
        param, flag = params[field_name], flag_of(field)
        assert flag.help and param.help.startswith(flag.help), field_name
        if flag.argument:
            assert param.param_type_name == "argument", field_name
        else:
            assert set(flag_names(field)) <= set(param.opts), (field_name, param.opts)


def test_recipe_keys_are_the_pretrain_options():
    assert set(recipe_fields()) == {"domain"} | {field.name for field in dataclasses.fields(PretrainOptions)}


def sample_arguments(options_class) -> tuple[list[str], dict]:
    """Command-line arguments giving every option a value other than its default, and the values
    the options dataclass must then hold."""
    arguments, flags, expected = [], [], {}
    for field in dataclasses.fields(options_class):
        flag = flag_of(field)
        if flag.argument:
            value = f"given-{field.name}"
            arguments.append(value)
        elif field.type in (bool, "bool") or "bool" in str(field.type):
            value = True
            flags.append(flag_names(field)[0])
        elif flag.choices:
            value = next(choice for choice in flag.choices if choice != field.default)
            flags += [flag_names(field)[0], value]
        elif "int" in str(field.type):
            value = 9 if flag.maximum is None else int(flag.maximum)
            flags += [flag_names(field)[0], str(value)]
        elif "float" in str(field.type):
            value = 0.5
            flags += [flag_names(field)[0], str(value)]
        else:
            value = f"given-{field.name}"
            flags += [flag_names(field)[0], value]
        expected[field.name] = value
    return arguments + flags, expected


@pytest.mark.parametrize("name", COMMANDS)
def test_each_flag_reaches_its_option(name, monkeypatch):
    options_class, own = COMMANDS[name]
    received = {}

    class Reached(Exception):
        pass

    def capture(options, *rest, **keywords):
        received["options"] = options
        raise Reached

    monkeypatch.setattr(api, name, capture)
    arguments, expected = sample_arguments(options_class)
    domain = ["--domain", "cats"] if "domain" in own else []
    result = runner.invoke(app, [name, *arguments, *domain])
    assert "options" in received, result.output
    got = dataclasses.asdict(received["options"])
    assert got == expected


@pytest.mark.parametrize(
    "make",
    [
        lambda: PretrainOptions(data="d", out="o", offsets="dense"),
        lambda: PretrainOptions(data="d", out="o", ema_decay=1.5),
        lambda: TuneOptions(image="i", save_precision="int4"),
        lambda: GenerateOptions(concept="c", prompt="p", encoder_every=0),
        lambda: GenerateOptions(concept="c", prompt="p", num_images=0),
    ],
)
def test_the_api_refuses_what_the_cli_refuses(make):
    with pytest.raises(UsageError):
        make()


def test_a_recipe_value_out_of_its_declared_choices_is_one_line_naming_the_flag(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("domain: cats\ndata: d\nout: o\noffset_layers: everything\n")
    result = runner.invoke(app, ["pretrain", "--config", str(recipe)])
    assert result.exit_code == 2
    assert "--offset-layers 'everything'" in result.stderr and "attention+resnets" in result.stderr
