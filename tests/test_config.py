"""Config files and values (`mygpt_jax.config`, `overrides.load_config`): a config file builds on the locked
base, so a key it sets that does not exist, or a value of another type, is one ConfigError naming the file, the
key and the closest key or the expected type; `validate` checks each section's values, in-process."""

import glob
import inspect
import os

import ml_collections
import pytest

from configs.tiny import get_config
from mygpt_jax import config as config_module, experiments, overrides
from mygpt_jax.config import base_config, validate
from mygpt_jax.errors import ConfigError
from tests.utils import REPO


def config_file(folder, *lines: str) -> str:
    path = folder / "my_config.py"
    body = "".join(f"    {line}\n" for line in lines)
    path.write_text(f"from mygpt_jax.config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
                    f"{body}    return c\n")
    return str(path)


def load_error(path: str) -> str:
    with pytest.raises(ConfigError) as e:
        overrides.load_config(path)
    return str(e.value)


@pytest.mark.parametrize("line, key, closest", [
    ("c.model.emb_dimm = 3", "model.emb_dimm", "model.emb_dim"),
    ("c.trian.seed = 3", "trian", "train"),  # reading a group that does not exist
    ("m = c.model; m.n_layerz = 2", "n_layerz", "model.n_layers"),  # through another name: the key alone
    ("c['train']['num_epochz'] = 1", "num_epochz", "train.num_epochs"),
])
def test_a_typo_in_a_config_file_names_the_file_line_key_and_closest_key(tmp_path, line, key, closest):
    path = config_file(tmp_path, "c.run_name = 'mine'", line)
    message = load_error(path)
    assert f"{path} line 7" in message and f"'{key}'" in message and f"did you mean '{closest}'" in message


@pytest.mark.parametrize("line, key, kind", [
    ("c.train.batch_size = '8'", "train.batch_size", "an integer"),  # refused by the locked base on its line
    ("c.model.drop_rate = None", "model.drop_rate", "a number"),  # found after get_config() returns
    ("c.train.resume = 'no'", "train.resume", "True or False"),
    ("c.model = 3", "'model' is a group of keys", ""),
])
def test_a_value_of_the_wrong_type_in_a_config_file_names_the_key_and_its_type(tmp_path, line, key, kind):
    path = config_file(tmp_path, line)
    message = load_error(path)
    assert path in message and key in message and kind in message and "Traceback" not in message


def test_an_integer_for_a_number_key_is_that_number(tmp_path):
    config = overrides.load_config(config_file(tmp_path, "c.model.drop_rate = None", "c.model.drop_rate = 0",
                                               "c.train.learning_rate = 1"))
    assert type(config.model.drop_rate) is float and type(config.train.learning_rate) is float


def test_a_config_not_built_on_the_base_names_the_key_it_lacks_or_adds(tmp_path):
    path = tmp_path / "own.py"
    extra = base_config().to_dict()
    extra["train"]["num_epochz"] = 3
    path.write_text(f"import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict({extra!r})\n")
    assert "unknown config key 'train.num_epochz' (did you mean 'train.num_epochs'?)" in load_error(str(path))
    path.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict({'a': 'x'})\n")
    assert "unknown config key 'a'" in load_error(str(path))
    path.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict({'run_name': ''})"
                    "\n")
    assert "lacks the key" in load_error(str(path)) and "base_config()" in load_error(str(path))


def test_any_other_mistake_in_get_config_names_the_file_and_line(tmp_path):
    path = config_file(tmp_path, "c.train.num_epochs = 1 // 0")
    message = load_error(path)
    assert f"{path} line 6" in message and "ZeroDivisionError" in message


def test_the_base_config_is_locked_and_every_shipped_config_loads_and_validates():
    with pytest.raises(AttributeError):
        base_config().model.emb_dimm = 3
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        validate(overrides.load_config(path))


def test_a_sweep_file_with_a_typo_or_a_wrong_type_names_the_sweep_and_the_key(tmp_path):
    base = config_file(tmp_path, "c.model.emb_dimm = 3")
    sweep = tmp_path / "sweep.py"
    sweep.write_text(f'BASE = {base!r}\nGRID = {{"model.drop_rate": [0.0]}}\nSEEDS = [1]\n')
    with pytest.raises(ConfigError, match=r"line 6: unknown config key 'model.emb_dimm' \(did you mean 'model.emb_dim"):
        experiments.load_sweep(str(sweep))
    sweep.write_text(f'BASE = {os.path.join(REPO, "configs", "tiny.py")!r}\n'
                     'VARIANTS = {"a": {"model.emb_dimm": 3}, "b": {"model.drop_rate": None}}\nSEEDS = [1]\n')
    with pytest.raises(ConfigError, match=r"unknown config key 'model.emb_dimm' \(did you mean 'model.emb_dim'"):
        experiments.load_sweep(str(sweep))
    sweep.write_text(f'BASE = {os.path.join(REPO, "configs", "tiny.py")!r}\n'
                     'VARIANTS = {"b": {"model.drop_rate": None}}\nSEEDS = [1]\n')
    with pytest.raises(ConfigError, match=r"VARIANTS\['b'\]\): model.drop_rate = None has the wrong type; "
                                          r"model.drop_rate takes a number"):
        experiments.load_sweep(str(sweep))


@pytest.mark.parametrize("key, value, what", [
    ("train.warmup_steps", -1, "must be >= 0 (0 = no warmup)"),
    ("train.learning_rate", 0.0, "must be positive"),
    ("train.weight_decay", -0.1, "must be >= 0"),
    ("train.beta1", 1.0, "must be in [0, 1)"),
    ("train.beta2", -0.5, "must be in [0, 1)"),
    ("train.eps", 0.0, "must be positive"),
    ("train.min_lr_ratio", 1.5, "must be in [0, 1]"),
    ("train.grad_clip", -1.0, "must be >= 0 (0 = no clipping)"),
    ("train.weight_decay_params", "biases", "use all or matrices"),
    ("train.seed", -1, "must be >= 0"),  # numpy's epoch order would fail mid-run
    # Smaller than the tokenizer's: its ids would index past the embedding, and the loss turn nan.
    ("model.vocab_size", 50000, "the GPT-2 tokenizer's ids go up to 50256, so it must be at least 50257"),
    ("model.emb_dim", 33, "must be divisible by model.n_heads=2"),
    ("mesh.fsdp", 0, "must be a positive size"),
    ("distributed.process_id", 1, "must be in [0, distributed.num_processes=1)"),
    ("data.sampling", "shuffle", "use epochs or random"),
    ("sample.top_p", 0.0, "must be in (0, 1]"),
    ("eval.split", "test", "use train, val"),
    # "" would write the run and data folders into the current folder
    ("checkpoint_dir", "", "it is the folder of every run and prepared corpus"),
    ("run_name", "data", "hold other things"),
])
def test_each_setting_is_checked_under_its_own_name(key, value, what):
    config = get_config()
    validate(config)
    *group, name = key.split(".")
    (config[group[0]] if group else config)[name] = value
    with pytest.raises(ConfigError) as e:
        validate(config)
    assert str(e.value).startswith(f"--config.{key}={value!r} is invalid: ") and what in str(e.value)


def test_validation_is_one_small_function_per_section():
    for check in config_module.VALIDATORS:
        assert len(inspect.getsource(check).splitlines()) <= 60, check.__name__
    assert isinstance(get_config(), ml_collections.ConfigDict)
