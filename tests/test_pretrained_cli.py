"""OpenAI-format GPT-2 end to end through the real commands: download from a loopback server, convert,
sample one-shot and in the chat, evaluate, fine-tune. The checkpoint is synthetic (GPT-2's vocabulary,
tiny dimensions) and written with TensorFlow in OpenAI's exact layout."""

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from mygpt_jax.tokenizer import encode
from tests.openai_checkpoint import numpy_gpt2, openai_variables, write_checkpoint
from tests.utils import REPO, after_the_device_line, cli_env, run_cli

HPARAMS = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}
GPT2 = f"{REPO}/configs/gpt2_124m.py"
TEXT = "It had always been his fate to have women say such things of him: the fact should be set down."


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A synthetic GPT-2 '124M' folder served from 127.0.0.1, and a checkpoint_dir that loads from it."""
    from tests.conftest import Server

    folder = write_checkpoint(tmp_path_factory.mktemp("openai") / "124M", openai_variables(HPARAMS), HPARAMS)
    server = Server(folder.parent)
    server.root = folder
    ckpt = tmp_path_factory.mktemp("ckpt")
    yield folder, server, [f"--config.checkpoint_dir={ckpt}", "--config.weights_sources=openai",
                           f"--config.weights_urls={server.base}"]
    server.stop()


def test_one_shot_sample_downloads_converts_then_uses_the_cache(served):
    _, server, args = served
    first = run_cli("sample", *args, "--config.sample.prompt=Every effort moves you",
                    "--config.sample.temperature=0", config=GPT2)
    assert first.returncode == 0, first.stderr
    assert "converted from TensorFlow" in first.stderr
    assert first.stdout.startswith("Every effort moves you") and len(first.stdout) > len("Every effort moves you\n")
    assert len(server.fetched()) == 7
    second = run_cli("sample", *args, "--config.sample.prompt=Every effort moves you",
                     "--config.sample.temperature=0", config=GPT2)
    assert "Orbax cache" in second.stderr and len(server.fetched()) == 7
    assert second.stdout == first.stdout  # greedy: the same text from the cached weights


def test_chat_streams_completions_and_ends_on_exit(served):
    _, _, args = served
    stdin = "Every effort moves you\n\nI HAD always thought\nexit\nnot read\n"
    result = run_cli("sample", *args, "--config.sample.max_new_tokens=8", "--config.sample.seed=3",
                     config=GPT2, input=stdin)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("MyGPT: Please enter a sentence to complete (enter 'exit' to end chat)\n")
    assert out.count("> ") == 4  # two prompts, the empty line (ignored) and 'exit'
    assert "> Every effort moves you" in out and "> I HAD always thought" in out
    assert "not read" not in out


def test_chat_ends_cleanly_at_end_of_input(served):
    _, _, args = served
    result = run_cli("sample", *args, "--config.sample.max_new_tokens=4", config=GPT2, input="Hello\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert result.stdout.rstrip().endswith(">")


def test_prompt_longer_than_the_context_keeps_its_last_tokens(served):
    _, _, args = served
    prompt = " ".join(["word"] * 100)
    result = run_cli("sample", *args, f"--config.sample.prompt={prompt}", "--config.sample.max_new_tokens=4",
                     config=GPT2)
    assert result.returncode == 0, result.stderr
    assert "the prompt has 100 tokens" in result.stderr and "kept its last 60" in result.stderr


def test_one_shot_sample_near_the_context_keeps_the_prompt_and_caps_the_new_tokens(served):
    _, _, args = served
    result = run_cli("sample", *args, "--config.sample.prompt=Every effort moves you",
                     "--config.sample.max_new_tokens=63", config=GPT2)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(notes) == 1 and "capped at 60" in notes[0], result.stderr
    assert result.stdout.startswith("Every effort moves you")


def test_evaluate_matches_a_numpy_forward_pass(served, tmp_path):
    folder, _, args = served
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    result = run_cli("evaluate", *args, f"--config.eval.text_file={text_file}", "--config.eval.json=True",
                     config=GPT2)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    ids = np.asarray([encode(TEXT)])
    logits = numpy_gpt2(folder, ids[:, :-1], HPARAMS)[0]
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean(log_probs[np.arange(ids.shape[1] - 1), ids[0, 1:]])
    assert report["tokens"] == ids.shape[1] - 1
    assert report["loss"] == pytest.approx(expected, abs=1e-4)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))


def test_fine_tuning_starts_from_the_pretrained_weights(served, tmp_path):
    _, _, args = served
    model = ["--config.model.emb_dim=32", "--config.model.n_heads=4", "--config.model.n_layers=2",
             "--config.model.qkv_bias=True", "--config.model.tie_embeddings=True",
             "--config.model.context_length=32"]
    result = run_cli("train", *args, "--config.init_from=gpt2_124m", "--config.train.max_steps=2",
                     "--config.train.eval_freq=1", "--config.run_name=ft", *model)
    assert result.returncode == 0, result.stderr
    assert "loaded a model of 2 layers of 32, 4 heads, context 64" in result.stderr
    wrong = run_cli("train", *args, "--config.init_from=gpt2_124m", "--config.run_name=ft2")
    assert wrong.returncode == 1 and "does not fit this model" in wrong.stderr


def test_no_network_is_one_clear_line(tmp_path):
    result = run_cli("sample", f"--config.checkpoint_dir={tmp_path}", "--config.weights_urls=http://127.0.0.1:9/x",
                     "--config.hub_url=http://127.0.0.1:9", "--config.sample.prompt=Hi", config=GPT2)
    assert result.returncode == 1
    lines = after_the_device_line(result)
    assert len(lines) == 1 and lines[0].startswith("error: hub: could not download config.json for ")
    assert " | openai: could not download checkpoint for GPT-2 124M " in lines[0] and "weights_dir" in lines[0]


def test_the_chat_in_a_terminal_keeps_the_prompt_edits_the_line_and_recalls_history(served, tmp_path):
    """Typed into a real terminal (tmux): with max_new_tokens at the context, each prompt is kept whole and the new
    tokens capped, said once; Ctrl-A moves to the start of the line; Up recalls an earlier prompt."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    _, _, args = served
    tmux = ["tmux", "-L", f"mygpt-{os.getpid()}", "-f", "/dev/null"]
    command = shlex.join([sys.executable, "-m", "mygpt_jax.sample", "--config", GPT2, *args,
                          "--config.sample.max_new_tokens=63", "--config.sample.temperature=0"])
    subprocess.run([*tmux, "new-session", "-d", "-x", "200", "-y", "60", "-s", "chat",
                    f"{command}; echo status=$?; sleep 600"], cwd=REPO, env=cli_env(), check=True)
    try:
        def screen() -> list[str]:
            text = subprocess.run([*tmux, "capture-pane", "-p", "-J", "-S", "-", "-t", "chat"], capture_output=True,
                                  text=True, check=True).stdout.rstrip("\n")
            return [line.rstrip() for line in text.splitlines()]  # not the empty rows, nor trailing blanks

        def type_line(*keys: str, prompts: int) -> list[str]:
            subprocess.run([*tmux, "send-keys", "-t", "chat", *keys], check=True)
            deadline = time.time() + 120
            while sum(line.startswith(">") for line in screen()) < prompts or not screen()[-1].startswith(">"):
                assert time.time() < deadline, "\n".join(screen())
                time.sleep(0.2)
            return screen()

        type_line(prompts=1)
        type_line("-l", "effort moves you", prompts=1)
        type_line("C-a", prompts=1)
        type_line("-l", "Every ", prompts=1)
        type_line("Enter", prompts=2)
        type_line("-l", "I HAD", prompts=2)
        type_line("Enter", prompts=3)
        lines = type_line("Up", "Up", "Enter", prompts=4)
        assert [line for line in lines if line.startswith(">")][:4] == [
            "> Every effort moves you", "> I HAD", "> Every effort moves you", ">"], lines
        completions = [line for line in lines if line.startswith(("Every effort moves you", "I HAD"))]
        assert len(completions) == 3 and all(len(line) > len("Every effort moves you ") for line in completions)
        notes = [line for line in lines if "max_new_tokens=63 is capped" in line]
        assert len(notes) == 1 and "capped at 60" in notes[0] and not any("kept its last" in line for line in lines)
        subprocess.run([*tmux, "send-keys", "-t", "chat", "-l", "exit"], check=True)
        subprocess.run([*tmux, "send-keys", "-t", "chat", "Enter"], check=True)
        deadline = time.time() + 60
        while "status=0" not in (shown := screen()):  # one look a round: the status may print between two
            assert time.time() < deadline and "status=" not in "".join(shown), "\n".join(shown)
            time.sleep(0.2)
        assert "Traceback" not in "\n".join(screen())
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
