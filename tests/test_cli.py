"""One exit-code rule for every command (`cli.run`, docs/development.md): 2 for a bad command line or config, 1 for
a failure while running, 130 for Ctrl-C, 0 for --help. In-process where the entry allows it (`cli.run` on a
command line, the real absl parsing and config loading), one subprocess per kind of entry end to end."""

import sys

import pytest

from mygpt_jax import backends, cli, experiments
from mygpt_jax.errors import ConfigError, UserError
from tests.utils import TINY, run_cli


def run_in_process(monkeypatch, capsys, main, *args: str, own_args: bool = False) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of `cli.run(main)` on the command line `args`; stdout in `run_in_process.out`."""
    monkeypatch.setattr(sys, "argv", ["mygpt_jax.test", *args])
    with pytest.raises(SystemExit) as e:
        cli.run(main, compilation_cache=False, own_args=own_args)
    captured = capsys.readouterr()
    run_in_process.out = captured.out
    return e.value.code, captured.err.strip().splitlines()


def raises(error: BaseException):
    def main(_):
        raise error
    return main


@pytest.mark.parametrize("args, main, status, cause", [
    (["--config", TINY, "--nosuchflag"], raises(AssertionError()), 2, "nosuchflag"),  # a bad flag
    (["--config", TINY, "--config.train.num_epochz=1"], raises(AssertionError()), 2, "train.num_epochs"),
    (["--config", TINY, "unexpected"], raises(AssertionError()), 2, "unexpected"),
    (["--config", TINY, "--config.train.batch_size=0"], raises(AssertionError()), 2, "train.batch_size"),  # validate
    (["--config", TINY], raises(ConfigError("the weights do not fit model.x")), 2, "model.x"),  # found while running
    (["--config", TINY], raises(UserError("no checkpoint in x")), 1, "no checkpoint"),
])
def test_a_bad_command_line_or_config_exits_2_and_a_failure_while_running_1(monkeypatch, capsys, args, main, status,
                                                                             cause):
    code, lines = run_in_process(monkeypatch, capsys, main, *args)
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == status and len(errors) == 1 and cause in errors[0] and lines[-1] == errors[0], lines


@pytest.mark.parametrize("own_args", [False, True])
def test_ctrl_c_exits_130(monkeypatch, capsys, own_args):
    code, lines = run_in_process(monkeypatch, capsys, raises(KeyboardInterrupt()), "--config", TINY, own_args=own_args)
    assert code == 130 and lines[-1] == "interrupted"


def test_a_sweep_starts_through_cli_run_and_follows_the_same_rule(monkeypatch, capsys, tmp_path):
    sweep = tmp_path / "s.py"
    sweep.write_text(f'BASE = {TINY!r}\nGRID = {{"model.drop_rat": [0.0]}}\nSEEDS = [1]\n')
    code, lines = run_in_process(monkeypatch, capsys, experiments.main, str(sweep), own_args=True)
    assert code == 2 and len(lines) == 1 and "model.drop_rate" in lines[0]
    sweep.write_text(f'BASE = {TINY!r}\nGRID = {{"model.drop_rate": [0.0]}}\nSEEDS = [1]\n')
    code, lines = run_in_process(monkeypatch, capsys, experiments.main, str(sweep), "--dry-run",
                                 f"--config.checkpoint_dir={tmp_path}", own_args=True)
    assert code == 0 and lines == [backends.describe()]  # it resolves the backend's values: jax runs


def test_help_exits_0_and_says_how_to_see_the_config_keys(monkeypatch, capsys):
    for args in (["--help"], ["-h", "--config.train.seed=2"]):
        code, _ = run_in_process(monkeypatch, capsys, raises(AssertionError()), *args)
        assert code == 0
    code, _ = run_in_process(monkeypatch, capsys, raises(AssertionError()), "--config", TINY, "--help",
                             "--config.train.seed=7")
    out = run_in_process.out
    assert code == 0 and "mygpt_jax/config.py" in out and "train.seed = 7" in out and "model.emb_dim = 32" in out


def test_the_entries_exit_by_the_rule_end_to_end(tmp_path):
    bad = run_cli("train", "--config.train.max_steps=-1", f"--config.checkpoint_dir={tmp_path}")
    assert bad.returncode == 2 and "train.max_steps" in bad.stderr and "Traceback" not in bad.stderr
    helped = run_cli("sample", "--help")
    assert helped.returncode == 0 and "--config.<key>=<value>" in helped.stdout and "mygpt_jax/config.py" in \
        helped.stdout and "Traceback" not in helped.stderr
    failed = run_cli("sample", f"--config.checkpoint_dir={tmp_path}")
    assert failed.returncode == 1 and "no checkpoint in" in failed.stderr and "Traceback" not in failed.stderr
    assert not list(tmp_path.iterdir())
