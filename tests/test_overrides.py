"""One override parser for every command line and the sweeps (`mygpt_jax.overrides`): each value type of
config.py parses from its text, the value keeps '=' and ',', and a bad override is one line naming the key."""

import pytest

from configs.tiny import get_config
from mygpt_jax import experiments, overrides
from mygpt_jax.config import base_config, flatten
from mygpt_jax.errors import UserError
from tests.utils import TINY, run_cli


@pytest.mark.parametrize("arg, key, value", [
    ("--config.train.num_epochs=3", "train.num_epochs", 3),
    ("--config.train.max_steps=-1", "train.max_steps", -1),
    ("--config.train.learning_rate=1e-3", "train.learning_rate", 1e-3),
    ("--config.model.drop_rate=0", "model.drop_rate", 0.0),  # an integer is a number
    ("--config.train.resume=False", "train.resume", False),
    ("--config.train.resume=true", "train.resume", True),
    ("--config.train.resume=0", "train.resume", False),
    ("--config.train.resume", "train.resume", True),  # a bare True/False key
    ("--noconfig.train.resume", "train.resume", False),
    ("--config.sample.prompt=", "sample.prompt", ""),
    ("--config.sample.prompt=a = b, c", "sample.prompt", "a = b, c"),
    ("--config.weights_urls=http://a/x?k=v,http://b", "weights_urls", "http://a/x?k=v,http://b"),
    ("--config.data.exclude=test/*,*.tmp", "data.exclude", "test/*,*.tmp"),
])
def test_an_override_is_typed_like_the_keys_default(arg, key, value):
    parsed_key, parsed = overrides.parse_override(arg, get_config())
    assert (parsed_key, parsed) == (key, value) and type(parsed) is type(value)


def test_every_key_of_the_base_config_can_be_set_from_its_own_text():
    config = base_config()
    for key, value in flatten(config.to_dict()).items():
        text = str(value)
        assert overrides.parse_override(f"--config.{key}={text}", config) == (key, value), key


@pytest.mark.parametrize("arg, message", [
    ("--config.train.num_epochz=3", "unknown config key 'train.num_epochz' (did you mean 'train.num_epochs'?); "
                                    "the keys and their defaults are in mygpt_jax/config.py"),
    ("--config.trian.num_epochs=3", "unknown config key 'trian.num_epochs' (did you mean 'train.num_epochs'?)"),
    ("--config.train=3", "'train' is a group of keys, not a value; set one of them"),
    ("--config.train.num_epochs=three", "--config.train.num_epochs=three: 'three' is not an integer (the type of "
                                        "train.num_epochs)"),
    ("--config.model.n_layers=2.0", "'2.0' is not an integer"),
    ("--config.train.resume=yes", "'yes' is not True or False"),
    ("--config.model.drop_rate=high", "'high' is not a number"),
    ("--config.train.num_epochs", "--config.train.num_epochs: write overrides as --config.<key>=<value>"),
    ("--noconfig.train.num_epochs", "--noconfig. only negates a True/False key"),
])
def test_a_bad_override_names_the_key_and_what_it_takes(arg, message):
    with pytest.raises(UserError) as e:
        overrides.parse_override(arg, get_config())
    assert message in str(e.value)


def test_a_config_from_a_file_is_locked_and_an_override_sets_no_new_key():
    config = overrides.load_config(TINY)
    overrides.apply_overrides(config, ["--config.train.num_epochs=2", "--config.train.num_epochs=4"])
    assert config.train.num_epochs == 4  # a later override wins
    with pytest.raises(AttributeError):
        config.train.num_epochz = 3
    with pytest.raises(UserError, match=r"wrong type; model.n_layers takes an integer"):
        overrides.set_value(config, "model.n_layers", 2.5, "here")


def test_a_command_line_splits_into_overrides_and_the_commands_own_arguments():
    argv = ["sweep.py", "--quick", "--config.train.num_epochs", "3", "--config.train.resume", "--dry-run",
            "--config.sample.prompt=", "--noconfig.train.tensorboard", "--", "--config.x=1"]
    assert overrides.split_args(argv) == (
        ["--config.train.num_epochs=3", "--config.train.resume", "--config.sample.prompt=",
         "--noconfig.train.tensorboard"],
        ["sweep.py", "--quick", "--dry-run", "--", "--config.x=1"])


def test_the_cli_and_the_sweeps_give_one_message_for_one_bad_override(tmp_path):
    sweep = tmp_path / "drop.py"
    sweep.write_text(f'BASE = "{TINY}"\nGRID = {{"model.drop_rate": [0.0]}}\nSEEDS = [1]\n')
    arg = "--config.train.num_epochs=three"
    with pytest.raises(UserError) as e:
        experiments.main([str(sweep), arg])
    result = run_cli("train", arg)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {e.value}"


@pytest.mark.parametrize("args, shown", [
    # What validation echoes is what the config holds: the text after the first '=', commas included.
    (["--config.run_name=a=b,c/d"], "--config.run_name='a=b,c/d' is invalid"),
    (["--config.run_name="], "--config.run_name='' is invalid"),
    (["--config.model.n_heads", "5"], "must be divisible by model.n_heads=5"),  # `--config.<key> <value>`
    (["--config.model.drop_rate=1"], "--config.model.drop_rate=1.0 is invalid"),
    (["--config.weights_sources=hub,openai,hub"], "--config.weights_sources='hub,openai,hub' is invalid"),
    (["--config.data.sampling=random", "--config.train.max_steps=-1"], "--config.train.max_steps=-1 is invalid"),
])
def test_the_cli_applies_each_override_through_the_shared_parser(args, shown):
    result = run_cli("train", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and shown in lines[0], result.stderr


def test_the_cli_keeps_its_own_flags_beside_the_overrides():
    result = run_cli("bench", "--steps=0", "--config.train.batch_size=2")
    assert result.returncode == 2 and "--steps" in result.stderr
