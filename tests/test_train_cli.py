"""The train and sample commands, run for real as subprocesses on the tiny config."""

import json
import os
import shutil
import signal

import pytest

from mygpt_jax import checkpoint
from mygpt_jax.backends import has_cudnn_attention
from mygpt_jax.data import default_text_path, load_text
from tests.utils import (
    TINY_RUN,
    after_the_device_line,
    checkpoint_steps as steps,
    read_metrics,
    run_cli,
    signal_mid_run,
)

RUN = TINY_RUN


@pytest.fixture
def full_run(tiny_run):
    """The suite's tiny run (conftest.py): read here, copied where a test changes it."""
    return tiny_run


# configs/tiny.py's losses (update, train, val) as the seed-era trainer printed them: a guard for the verdict run's
# figures (0.729 / 6.390, lowest 6.208), which take minutes. A changed data order, init, dropout or step moves them
# by far more than the tolerance, which leaves room for another CPU's float rounding.
TINY_LOSSES = [(1, 10.836452, 10.830210), (11, 10.716648, 10.734266), (21, 10.540972, 10.559427),
               (31, 10.346774, 10.373631), (36, 10.242248, 10.274310)]


def test_the_tiny_config_prints_the_losses_it_always_has(tiny_run):
    # The suite's run trains configs/tiny.py's first epoch as it is (a constant learning rate; evaluations and
    # samples change no state), evaluating every 5 updates: those at TINY_LOSSES' updates are configs/tiny.py's.
    by_update = {r["update"]: (r["train_loss"], r["val_loss"]) for r in read_metrics(tiny_run[0] / "tiny")}
    for update, want_train, want_val in TINY_LOSSES:
        train, val = by_update[update]
        assert train == pytest.approx(want_train, abs=1e-4) and val == pytest.approx(want_val, abs=1e-4)


def test_a_command_run_again_loads_its_compiled_programs(tmp_path):
    cache = tmp_path / "xla"
    args = [f"--config.checkpoint_dir={tmp_path}", f"--config.compilation_cache_dir={cache}",
            "--config.compilation_cache_min_seconds=0",  # keep every program, however fast it compiled
            "--config.train.resume=False", "--config.train.max_steps=3", "--config.train.flops_matmul_size=0"]
    first = run_cli("train", *args)
    assert first.returncode == 0, first.stderr
    kept = sorted(os.listdir(cache))
    assert kept, "the first run kept no compiled program"
    second = run_cli("train", *args)
    assert second.returncode == 0, second.stderr
    assert sorted(os.listdir(cache)) == kept  # every program came from the cache: nothing new was written
    smallest = min(kept, key=lambda entry: (cache / entry).stat().st_size)  # the quickest to compile again
    (cache / smallest).write_bytes((cache / smallest).read_bytes()[:50])  # as a reader finds it while another writes
    third = run_cli("train", *args)  # compiles it again, without a word about it
    assert third.returncode == 0 and after_the_device_line(third) == [], third.stderr
    losses = [[line for line in r.stdout.splitlines() if line.startswith("Ep ")] for r in (first, second, third)]
    assert losses[0] and losses[0] == losses[1] == losses[2]


def test_the_default_compilation_cache_follows_xdg_cache_home(compilation_cache):
    from mygpt_jax.config import base_config
    assert base_config().compilation_cache_dir == str(compilation_cache)


def test_train_prints_losses_samples_and_writes_run_dir(full_run):
    ckpt, result = full_run
    run_dir = ckpt / "tiny"
    after_the_device_line(result)  # printed first on stderr; stdout is the run's own
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"Prepared {ckpt}/data/the-verdict-") and "(split by characters)" in lines[0]
    assert lines[1].startswith("Model: 3,242,752 parameters")
    assert lines[2].startswith("Speed: ") and "of the measured float32 matmul rate" in lines[2]
    assert lines.count("Ep 1 (Step 000000): " + lines[3].split(": ", 1)[1]) == 1
    assert any(line.startswith("Ep 2 (Step 000070): Train loss ") for line in lines)
    samples = [line for line in lines if line.startswith("Every effort moves you")]
    assert len(samples) == 2  # one greedy sample after each epoch
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [*range(0, 72, 5), 71]  # and the final model
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.5
    assert all(r["tokens_per_s"] > 0 and 0 < r["flops_fraction"] < 2 for r in records)
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] == 72 and summary["num_params"] == 3_242_752
    assert steps(run_dir)[-1] == 72
    saved = checkpoint.restore_meta(str(run_dir))["config"]  # what "auto" became on this machine's backend
    assert (saved["model"]["dtype"], saved["model"]["attention"], saved["sample"]["decode_loop"]) == (
        "float32", "explicit", "device")


def test_a_resume_with_another_batch_size_and_no_prompt_goes_on_where_it_stopped(tmp_path):
    text = tmp_path / "short.txt"  # 14 training windows: 3 whole batches of 4 an epoch, or 7 of 2
    text.write_text(load_text(default_text_path())[:2000])
    run = [f"--config.checkpoint_dir={tmp_path}", f"--config.data.path={text}", "--config.train.num_epochs=2",
           "--config.sample.prompt=", "--config.train.flops_matmul_size=0"]
    first = run_cli("train", *run, "--config.train.max_steps=1")
    assert first.returncode == 0, first.stderr
    # The 4 windows done are 2 batches of 2; the samples after each epoch are skipped, not fatal, without a prompt.
    second = run_cli("train", *run, "--config.train.batch_size=2")
    assert second.returncode == 0, second.stderr
    assert f"Resuming {tmp_path}/tiny from update 1 (epoch 1, batch 2)" in second.stdout
    assert "No samples during training: --config.sample.prompt is empty" in second.stdout
    assert "Training finished" in second.stdout and steps(tmp_path / "tiny")[-1] == 1 + 5 + 7


def test_ctrl_c_saves_and_the_rerun_resumes_bit_identically(full_run, tmp_path):
    full_ckpt, _ = full_run
    # Checkpointing every update, the interrupted update is always one already saved: the exit save must
    # not write it twice. (Checkpoint frequency does not change the losses.)
    status, err = signal_mid_run(signal.SIGINT, tmp_path / "tiny", f"--config.checkpoint_dir={tmp_path}", *RUN,
                                 "--config.train.checkpoint_every=1")
    assert status == 130, err
    assert "Interrupted: saved update" in err and "Traceback" not in err and err.count("nterrupted") == 1, err
    saved = int(err.split("Interrupted: saved update ")[1].split()[0])
    assert 0 < saved < 72 and steps(tmp_path / "tiny")[-1] == saved

    resumed = run_cli("train", f"--config.checkpoint_dir={tmp_path}", *RUN)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming {tmp_path}/tiny from update {saved}" in resumed.stdout
    keys = ("update", "train_loss", "val_loss", "batch_loss", "tokens_seen")
    got = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "tiny")]
    want = [{k: r[k] for k in keys} for r in read_metrics(full_ckpt / "tiny")]
    assert got == want  # exactly the same floats as the uninterrupted run


def test_rerunning_a_finished_run_trains_nothing_and_keeps_its_summary(full_run, tmp_path):
    shutil.copytree(full_run[0] / "tiny", tmp_path / "tiny")
    ckpt = tmp_path
    summary = (ckpt / "tiny" / "summary.json").read_text()
    again = run_cli("train", f"--config.checkpoint_dir={ckpt}", *RUN)
    assert again.returncode == 0 and "already trained (72 updates); raise --config.train.num_epochs" in again.stdout
    assert steps(ckpt / "tiny")[-1] == 72
    assert (ckpt / "tiny" / "summary.json").read_text() == summary


def test_resuming_names_the_settings_changed_since_the_checkpoint(full_run, tmp_path):
    shutil.copytree(full_run[0] / "tiny", tmp_path / "tiny")
    noted = run_cli("train", f"--config.checkpoint_dir={tmp_path}", *RUN, "--config.train.learning_rate=0.001")
    assert noted.returncode == 0, noted.stderr
    assert "Settings changed since that checkpoint: train.learning_rate: 0.0004 -> 0.001" in noted.stdout
    # A warmup schedule adds a step counter to the optimizer state: the checkpoint cannot hold it.
    refused = run_cli("train", f"--config.checkpoint_dir={tmp_path}", *RUN, "--config.train.warmup_steps=5")
    lines = after_the_device_line(refused)
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr
    assert "does not fit settings changed since it was saved (train.warmup_steps: 0 -> 5)" in lines[0]
    other_model = run_cli("train", f"--config.checkpoint_dir={tmp_path}", *RUN, "--config.model.n_layers=3")
    lines = after_the_device_line(other_model)
    assert other_model.returncode == 1 and len(lines) == 1, other_model.stderr
    assert "was trained with another model (model.n_layers: 2 -> 3)" in lines[0]


def test_sample_reads_the_newest_intact_checkpoint_with_one_note(full_run, tmp_path):
    shutil.copytree(full_run[0] / "tiny", tmp_path / "tiny")
    last, before = steps(tmp_path / "tiny")[-1], steps(tmp_path / "tiny")[-2]
    for manifest in (tmp_path / "tiny" / str(last) / "params").rglob("manifest.ocdbt"):
        manifest.write_bytes(b"not a manifest")
    for _ in range(2):  # the noise it once printed came in some runs only
        result = run_cli("sample", f"--config.checkpoint_dir={tmp_path}")
        lines = after_the_device_line(result)
        assert result.returncode == 0, result.stderr
        assert lines[0].startswith(f"note: checkpoint {tmp_path}/tiny/{last} is damaged (its params cannot be read); "
                                   f"using update {before}, the newest intact one"), result.stderr
        assert lines[1].startswith(f"loaded {tmp_path}/tiny (update {before})") and len(lines) == 2, result.stderr
        assert "delete" not in result.stderr and "resume=False" not in result.stderr
    assert steps(tmp_path / "tiny") == [before, last]  # nothing deleted


def test_a_diverging_run_stops_with_one_line_and_keeps_no_broken_checkpoint(tmp_path):
    run = [f"--config.checkpoint_dir={tmp_path}", "--config.train.learning_rate=1e3", "--config.train.max_steps=12",
           "--config.train.checkpoint_every=1", "--config.train.flops_matmul_size=0"]
    # Caught by a checkpoint (no evaluation until update 11): the non-finite state is not saved.
    result = run_cli("train", *run, "--config.train.eval_freq=10")
    lines = after_the_device_line(result)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    bad = int(lines[0].split("the parameters are not finite at update ")[1].split(":")[0])
    assert f"training diverged (the checkpoint of update {bad - 1} is kept; " in lines[0]
    assert "--config.train.resume_step=N resumes from an older one); lower --config.train.learning_rate (now 1000)" \
        in lines[0]
    assert steps(tmp_path / "tiny")[-1] == bad - 1
    # Caught by an evaluation, resumed from that checkpoint: the loss is named and nothing more is saved.
    result = run_cli("train", *run, "--config.train.eval_freq=1")
    lines = after_the_device_line(result)
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert f"the loss is nan at update {bad}: training diverged (the checkpoint of update {bad - 1} is kept" \
           in lines[0] and steps(tmp_path / "tiny")[-1] == bad - 1


def test_sample_completes_the_prompt_from_the_checkpoint(full_run):
    ckpt, train_result = full_run
    result = run_cli("sample", f"--config.checkpoint_dir={ckpt}")
    assert result.returncode == 0, result.stderr
    assert after_the_device_line(result)[0].startswith(f"loaded {ckpt}/tiny (update 72)")
    last_training_sample = [line for line in train_result.stdout.splitlines() if line.startswith("Every effort")][-1]
    # greedy decoding of the same weights: the same text the training loop printed after its last epoch
    assert result.stdout.replace("\n", " ").strip() == last_training_sample.strip()


def test_sample_without_a_checkpoint_says_how_to_make_one(tmp_path):
    result = run_cli("sample", f"--config.checkpoint_dir={tmp_path}")
    assert result.returncode == 1
    assert after_the_device_line(result) == [
        f"error: no checkpoint in {tmp_path}/tiny; create it with: python -m mygpt_jax.train --config "
        f"{os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'tiny.py')}"]


# Settings are checked before JAX starts: their errors are the whole of stderr. Those found once it runs (files,
# the device) follow the device line.
@pytest.mark.parametrize("args, status, message, running", [
    (["--config.train.num_epochz=3"], 2, "unknown config key 'train.num_epochz' (did you mean 'train.num_epochs'?)",
     False),
    (["--config.train.num_epochs=three"], 2, "--config.train.num_epochs=three", False),
    (["--config.model.n_heads=5"], 2, "--config.model.emb_dim=32 is invalid: must be divisible by model.n_heads=5",
     False),
    (["--config.data.path=/no/such/file.txt"], 1, "data path /no/such/file.txt does not exist", True),
    (["--config.checkpoint_dir=/proc/mygpt_jax"], 1, "cannot create the run folder /proc/mygpt_jax/tiny", True),
    (["--config.model.attention=xla"], 2, "fused attention has no dropout on the attention weights; set "
                                          "--config.model.drop_rate=0.0 (now 0.1)", False),
    (["--config.sample.decode_loop=python"], 2, "--config.sample.decode_loop='python' is invalid: use auto, device "
                                                "or host", False),
    pytest.param(["--config.model.attention=cudnn", "--config.model.drop_rate=0", "--config.model.dtype=bfloat16"],
                 2, "model.attention='cudnn' needs an NVIDIA GPU of compute capability 8.0 or later; this jax "
                    "runs on cpu", True,
                 marks=pytest.mark.skipif(has_cudnn_attention(), reason="this machine runs cuDNN attention")),
])
def test_bad_input_gets_one_line(args, status, message, running, tmp_path):
    result = run_cli("train", f"--config.checkpoint_dir={tmp_path}", *args)
    assert result.returncode == status
    lines = after_the_device_line(result) if running else result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
