"""Bad input gets one `error: ...` line naming what to fix, before anything is compiled: the whole of stderr for a
setting (checked before JAX starts), the line after the device line for what only a running command finds."""

import subprocess
import sys

import jax
import pytest

from mygpt_jax import data, hardware
from mygpt_jax.errors import UserError
from mygpt_jax.overrides import CONFIG_FILE_HINT
from tests.utils import REPO, after_the_device_line, cli_env, run_cli


def one_line(result, status, running=False):
    """The error line; `running`: the command had started JAX, so the device line comes first."""
    lines = after_the_device_line(result) if running else result.stderr.strip().splitlines()
    assert result.returncode == status and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_missing_eval_text_file_names_eval_text_file():
    result = run_cli("evaluate", "--config.eval.text_file=/no/such/file.txt")
    assert one_line(result, 1, running=True) == ("error: data file /no/such/file.txt does not exist; point "
                                   "--config.eval.text_file at a UTF-8 text file")


def test_a_folder_without_text_files_as_data_path_names_the_glob(tmp_path):
    result = run_cli("train", f"--config.data.path={tmp_path}", f"--config.checkpoint_dir={tmp_path}")
    line = one_line(result, 1, running=True)
    assert f"the folder {tmp_path} has no file matching --config.data.glob='**/*.txt'" in line


def test_text_paths_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "my.txt").write_text("Every effort moves you")
    assert data.load_text("~/my.txt", key="eval.text_file") == "Every effort moves you"
    with pytest.raises(UserError, match=f"data file {tmp_path}/nope.txt does not exist; point --config.data.path"):
        data.load_text("~/nope.txt")


def test_negative_max_steps_names_max_steps(tmp_path):
    result = run_cli("train", "--config.train.max_steps=-1", f"--config.checkpoint_dir={tmp_path}")
    assert one_line(result, 2) == "error: --config.train.max_steps=-1 is invalid: must be >= 0 (0 = no limit)"


@pytest.mark.parametrize("body, problem", [
    ("def get_config():\n    return {'model': {}}\n", "get_config() returned a dict"),
    ("X = 1\n", "has no get_config()"),
])
def test_a_config_file_that_is_not_one_says_what_a_config_file_is(tmp_path, body, problem):
    path = tmp_path / "my_config.py"
    path.write_text(body)
    line = one_line(run_cli("train", config=str(path)), 2)
    assert line.startswith(f"error: the config file {path}") and problem in line and line.endswith(CONFIG_FILE_HINT)


def test_a_sweep_path_that_is_not_python_says_so():
    cmd = [sys.executable, "-m", "mygpt_jax.experiments", "experiments/README.md", "--dry-run"]
    result = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert one_line(result, 2) == ("error: sweep file experiments/README.md is not a Python file; give the path "
                                   "of a .py file")


def test_an_unwritable_compilation_cache_is_one_warning_and_off(tmp_path):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    folder = in_the_way / "xla"
    result = run_cli("train", f"--config.compilation_cache_dir={folder}", "--config.data.path=/no/such/file.txt",
                     f"--config.checkpoint_dir={tmp_path}")
    lines = after_the_device_line(result)
    assert result.returncode == 1 and len(lines) == 2, result.stderr
    assert lines[0] == (f"warning: cannot write the compilation cache folder {folder} (Not a directory); running "
                        "without it; set --config.compilation_cache_dir to a writable folder or \"\" to turn it off")
    assert lines[1].startswith("error: data path /no/such/file.txt does not exist")
    before = jax.config.jax_compilation_cache_dir
    hardware.use_compilation_cache(str(folder), 0.0)
    assert jax.config.jax_compilation_cache_dir == before
