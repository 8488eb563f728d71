"""Training on several devices: the mesh, the shardings of the state and the batches, checkpoints across meshes.

Four CPU devices stand in for accelerators (XLA's host-platform device count, which must be set before jax
starts, hence subprocesses). The sharded step must compute what the single-device step computes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import tiny
from mygpt_jax import sharding
from mygpt_jax.errors import UserError
from mygpt_jax.model import ModelConfig, init_params, logical_axes
from tests.utils import (
    REPO,
    assert_mesh_step_matches,
    devices_env,
    json_on_devices,
    read_metrics,
    run_cli,
    two_sharded_steps,
)

MESHES = [(4, 1, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2)]  # (data, fsdp, tensor)
DEVICES = "--xla_force_host_platform_device_count=4"


def tiny_model() -> ModelConfig:
    # 64 rows of padding: 50304 splits over mesh.tensor = 2; dropout stays on (its masks must not depend on the mesh)
    model = tiny.get_config().model
    model.dtype, model.attention = "float32", "explicit"
    return dataclasses.replace(ModelConfig.from_config(model), vocab_multiple=64, n_layers=1)


def mesh_config(data: int, fsdp: int, tensor: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def sharded_steps() -> dict:
    """Two train steps of a tiny model with 2 micro-batches, on one device and on each mesh of MESHES, made and
    run as the trainer does; run in the child."""
    from mygpt_jax import steps

    cfg, t = tiny_model(), tiny.get_config().train
    tx = steps.create_optimizer(t, total_steps=2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 4000).astype(np.uint16)
    starts = np.arange(8).reshape(2, 4) * 40  # 2 micro-batches of 4 windows

    def two_steps(mesh):
        return two_sharded_steps(cfg, tx, mesh, tokens, starts)

    reference, ref_state = two_steps(sharding.make_mesh(mesh_config(1, 1, 1), jax.devices()[:1]))
    ref_leaves = jax.tree_util.tree_leaves(jax.device_get(ref_state))
    out = {"devices": jax.device_count(), "single": reference}
    for shape in MESHES:
        losses, state = two_steps(sharding.make_mesh(mesh_config(*shape)))
        leaves = jax.tree_util.tree_leaves(jax.device_get(state))
        out[str(shape)] = {
            "losses": losses,
            "max_diff": max(float(np.abs(a - b).max()) for a, b in zip(leaves, ref_leaves, strict=True)),
            "c_fc": list(state.params["h_0"]["mlp"]["c_fc"]["kernel"].addressable_shards[0].data.shape),
            "wte": list(state.params["wte"]["embedding"].addressable_shards[0].data.shape),
            "wte_mu": list(state.opt_state[0].mu["wte"]["embedding"].addressable_shards[0].data.shape),
            "state_bytes": sharding.shard_bytes(state)}
    out["single_state_bytes"] = sharding.shard_bytes(ref_state)
    return out


@pytest.fixture(scope="module")
def on_four_devices():
    return json_on_devices("tests.test_sharding", "sharded_steps")


def test_logical_axes_name_every_dimension_of_every_parameter():
    cfg = tiny_model()
    params, axes = init_params(cfg, jax.random.key(0)), logical_axes(cfg)
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
    assert len(flat_params) == len(flat_axes)
    for path, value in flat_params:
        names = flat_axes[path]
        assert len(names) == value.ndim and all(isinstance(n, str) for n in names), (path, names)
    assert params["wte"]["embedding"].shape == (50304, 32)  # the padded vocabulary


@pytest.mark.parametrize("shape", [str(s) for s in MESHES])
def test_a_step_on_a_mesh_computes_the_single_device_step(on_four_devices, shape):
    assert_mesh_step_matches(on_four_devices, shape)


def test_the_parameters_and_the_optimizer_state_are_really_split(on_four_devices):
    out = on_four_devices
    assert out["(4, 1, 1)"]["c_fc"] == [32, 128] and out["(4, 1, 1)"]["wte"] == [50304, 32]  # data: replicated
    assert out["(1, 4, 1)"]["c_fc"] == [8, 128] and out["(1, 4, 1)"]["wte"] == [50304, 8]  # fsdp: embed / 4
    assert out["(1, 4, 1)"]["wte_mu"] == [50304, 8]  # the Adam moments lie as their parameters
    assert out["(2, 1, 2)"]["c_fc"] == [32, 64] and out["(2, 1, 2)"]["wte"] == [25152, 32]  # tensor: mlp, vocab / 2
    assert out["(1, 2, 2)"]["c_fc"] == [16, 64] and out["(1, 2, 2)"]["wte"] == [25152, 16]
    # FSDP over 4 devices: a quarter of the state per device, give or take the replicated scalars and biases.
    assert out["(1, 4, 1)"]["state_bytes"] <= out["single_state_bytes"] / 4 * 1.02


def test_a_mesh_that_does_not_fit_is_one_line():
    assert sharding.make_mesh(mesh_config(-1, 1, 1), jax.devices()[:1]).shape == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(UserError, match=r"mesh.data=2, mesh.fsdp=1, mesh.tensor=1 makes a mesh of 2 devices, and "
                                        r"there are 1"):
        sharding.make_mesh(mesh_config(2, 1, 1), jax.devices()[:1])
    # The divisibility checks read the mesh's shape alone.
    with pytest.raises(UserError, match=r"--config.mesh.tensor=4 does not divide the vocabulary of 50257 rows; pad it "
                                        r"with --config.model.vocab_multiple \(128 gives 50304\)"):
        sharding.check_fits(ModelConfig(), Shape(data=1, fsdp=1, tensor=4), 8, "rows")
    with pytest.raises(UserError, match=r"--config.model.emb_dim=768 is not divisible by --config.mesh.fsdp=5"):
        sharding.check_fits(ModelConfig(), Shape(data=1, fsdp=5, tensor=1), 10, "rows")


class Shape:
    def __init__(self, **sizes: int):
        self.shape = sizes


RUN = ["--config.train.flops_matmul_size=0", "--config.sample.prompt=", "--config.train.eval_freq=4",
       "--config.train.grad_accum_steps=2", "--config.train.batch_size=8", "--config.model.vocab_multiple=64"]


def train_on(devices: int, ckpt, *args: str) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "mygpt_jax.train", "--config", tiny.__file__,
                             f"--config.checkpoint_dir={ckpt}", *RUN, *args], cwd=REPO, env=devices_env(devices),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [{k: r[k] for k in ("update", "train_loss", "val_loss", "tokens_seen")} for r in read_metrics(ckpt / "tiny")]


def test_a_checkpoint_saved_on_one_mesh_trains_on_with_another(tmp_path):
    """FSDP over 4 devices for 6 steps, then 1 device to step 12, then 2 x 2 (data x tensor) to the end: the
    losses of one run on one device throughout."""
    whole = train_on(1, tmp_path / "whole", "--config.mesh.data=1")
    train_on(4, tmp_path / "moved", "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.train.max_steps=6")
    train_on(1, tmp_path / "moved", "--config.mesh.data=1", "--config.train.max_steps=12")
    moved = train_on(4, tmp_path / "moved", "--config.mesh.data=2", "--config.mesh.tensor=2")
    # The evaluations at each stop (updates 6 and 12) are extra; the others are the same evaluations.
    moved = [r for r in moved if r["update"] not in (6, 12)]
    assert [(r["update"], r["tokens_seen"]) for r in moved] == [(r["update"], r["tokens_seen"]) for r in whole]
    np.testing.assert_allclose([[r["train_loss"], r["val_loss"]] for r in moved],
                               [[r["train_loss"], r["val_loss"]] for r in whole], rtol=1e-5)
    assert len(whole) == 6 and whole[-1]["train_loss"] < whole[0]["train_loss"]


def test_a_batch_the_mesh_cannot_share_is_one_line(tmp_path):
    result = run_cli("train", f"--config.checkpoint_dir={tmp_path}", env=devices_env(3))  # every device on data
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 2 and lines[0].endswith(", 3 devices"), result.stderr
    assert lines[1] == ("error: --config.train.batch_size=4 / train.grad_accum_steps=1 gives 4 rows, which mesh.data "
                        "x mesh.fsdp = 3 devices cannot share; make it a multiple of that")


def test_evaluate_and_sample_lay_a_one_device_checkpoint_out_on_a_mesh(tmp_path):
    train_on(1, tmp_path, "--config.mesh.data=1", "--config.train.max_steps=3")
    args = [f"--config.checkpoint_dir={tmp_path}", "--config.model.vocab_multiple=64"]
    outputs = {}
    for devices, mesh in ((1, ["--config.mesh.data=1"]), (4, ["--config.mesh.data=2", "--config.mesh.tensor=2"])):
        evaluated = run_cli("evaluate", *args, *mesh, "--config.eval.json=True", env=devices_env(devices))
        sampled = run_cli("sample", *args, *mesh, "--config.sample.max_new_tokens=8", env=devices_env(devices))
        assert evaluated.returncode == 0 and sampled.returncode == 0, evaluated.stderr + sampled.stderr
        outputs[devices] = json.loads(evaluated.stdout), sampled.stdout
    assert outputs[4][0]["loss"] == pytest.approx(outputs[1][0]["loss"], rel=1e-5)
    assert outputs[4][1] == outputs[1][1]  # the same greedy text
