"""OpenAI-format GPT-2 end to end through the real commands: download from a loopback server, convert,
sample one-shot and in the chat, evaluate, fine-tune. The checkpoint is synthetic (GPT-2's vocabulary,
tiny dimensions) and written with TensorFlow in OpenAI's exact layout."""

import json
import math

import numpy as np
import pytest

from mygpt_jax.tokenizer import encode
from tests.openai_checkpoint import numpy_gpt2, openai_variables, write_checkpoint
from tests.utils import REPO, after_the_device_line, run_cli

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
    assert "the prompt has 100 tokens; kept its last 60" in result.stderr


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
