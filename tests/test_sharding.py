"""Sharded training (attnlab.sharding) against a single-device run, on 8 fake CPU devices.

One child process with 8 CPU devices (they must exist before jax starts, and
this process already has its one) trains the quick ViT and the quick LM for a
few steps on one device and under each mesh preset, on the same batches; runs
the ViT through train_and_evaluate on one mesh, stopped after a checkpoint and
resumed on another; runs the fused kernel (interpret mode) under shard_map;
trains a study group side by side with its cells split over the 8 devices and
on one; and collects the messages of refused meshes. It writes what it saw to a file
that the tests below read. Here, in one device: the resume of that checkpoint,
and the config checks that need no devices.
"""

import dataclasses
import os
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab import axes as axes_lib
from attnlab import configlib
from attnlab import data as data_lib
from attnlab import evaluate
from attnlab import experiment
from attnlab import metrics
from attnlab import models
from attnlab import placement
from attnlab import sharding
from attnlab import train
from attnlab.kernels import decode_attention
from attnlab.kernels import flash_attention
from attnlab.studies import cells
from attnlab.studies import stack
from attnlab.studies import study

# The parent's own run (a resume on one device) compiles as the child's do.
pytestmark = pytest.mark.usefixtures("fast_xla_compile")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 8
STEPS = 3
MODELS = {"vit": "configs/digits_vit.py:sigmoid,quick",
          "lm": "configs/mqar_transformer.py:sigmoid,quick"}
# The presets (attnlab.sharding's table), each on all 8 devices.
MESHES = {
    "data_parallel": {},
    "fsdp": {"fsdp": -1},
    "tensor_parallel": {"data": -1, "model": 2},
    "combined": {"data": 2, "fsdp": 2, "model": 2},
}
# Each run compiles two programs (~4 s of CPU): the three presets for both
# models here; all three axes at once for the ViT through train_and_evaluate.
CASES = [(model, mesh) for model in MODELS for mesh in MESHES if mesh != "combined"]
# What each preset must split, written out independently of axes.DEFAULT_RULES:
# logical name -> mesh axes (absent: replicated).
EXPECTED_SPLITS = {
    "data_parallel": {},
    "fsdp": {"embed": ("fsdp",)},
    "tensor_parallel": {"heads": ("model",), "kv_heads": ("model",), "mlp": ("model",),
                        "vocab": ("model",)},
    "combined": {"embed": ("fsdp",), "heads": ("model",), "kv_heads": ("model",),
                 "mlp": ("model",), "vocab": ("model",)},
}


# ----------------------------------------------------------------------------
# The child process.
# ----------------------------------------------------------------------------


def _config(spec, data_dir, mesh):
  config = configlib.load(spec)
  config.unlock()
  config.data.data_dir = data_dir
  config.mesh = mesh
  config.total_steps = STEPS  # the learning-rate schedule of a run of STEPS steps
  return config


def _train(spec, data_dir, mesh, devices):
  """STEPS train steps as attnlab.train takes them; losses, state and shardings."""
  exp = experiment.load(_config(spec, data_dir, mesh))
  fns = exp.fns()
  abstract = placement.abstract_state(fns, exp.trainer.seed)
  shard = placement.shardings(exp.trainer, abstract, batch_fields=("batch_size",),
                               devices=devices)
  state = placement.create_state(fns, exp.trainer.seed, shard)
  train_step = placement.jit_train_step(fns, shard)
  batches = data_lib.train_batches(exp.datasets, batch_size=exp.trainer.batch_size,
                                   num_steps=STEPS, seed=exp.trainer.seed)
  losses = []
  for s in range(STEPS):
    state, step_metrics = train_step(state, jax.device_put(batches[s], shard.batch))
    losses.append(float(step_metrics["loss"]))
  return losses, state


def _placement(state):
  """Per parameter (and Adam moment) path: (logical axes, mesh shape, spec, a shard's shape)."""
  out = {}
  leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for path, leaf in leaves:
    if isinstance(leaf, nnx.Variable):
      array = leaf.get_value()
      out[jax.tree_util.keystr(path)] = (
          axes_lib.variable_axes(leaf), dict(array.sharding.mesh.shape),
          tuple(array.sharding.spec), array.addressable_shards[0].data.shape, array.shape)
  return out


def _errors(data_dir):
  """The messages of configs that must be refused on 8 devices."""
  cases = {
      "batch": ("configs/digits_vit.py:quick", {"fsdp": 2, "data": 4}, {"batch_size": 12}),
      "product": ("configs/digits_vit.py:quick", {"data": 3, "model": 2}, {}),
      "rest": ("configs/digits_vit.py:quick", {"data": -1, "model": 3}, {}),
      "heads": ("configs/digits_vit.py:quick", {"data": 2, "model": 4}, {}),
  }
  messages = {}
  for name, (spec, mesh, overrides) in cases.items():
    config = _config(spec, data_dir, mesh)
    config.update(overrides)
    exp = experiment.load(config)
    try:
      placement.shardings(exp.trainer, placement.abstract_state(exp.fns(), 0))
    except configlib.ConfigError as e:
      messages[name] = str(e)
  return messages


# The fused kernel (interpret mode) on 8 devices as data x model = 2x4 and 4x2:
# (mesh, kind, heads, kv heads, segment ids).
PALLAS_CASES = {
    "sigmoid_heads_over_4": ({"data": 2, "model": 4}, "sigmoid", 4, 4, False),
    "softmax_gqa_segments": ({"data": 4, "model": 2}, "softmax", 4, 2, True),
}


def _pallas(mesh_cfg, kind, heads, kv_heads, segments):
  """Values and gradients of the kernel unsharded and on the mesh, and whether it shard_maps."""
  mesh = sharding.make_mesh(sharding.mesh_shape(mesh_cfg))
  batch, length, dim = 4, 32, 16
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, dim))
  k, v = (jax.random.normal(key, (batch, length, kv_heads, dim)) for key in keys[1:])
  bias = jnp.linspace(-4.0, -1.0, heads)  # one (learned) bias per head: it gets a gradient
  seg = jnp.repeat(jnp.arange(2), length // 2)[None].repeat(batch, 0) if segments else None

  def loss(q, k, v, bias):
    out = flash_attention(q, k, v, kind=kind, sigmoid_bias=bias, is_causal=True,
                          q_segment_ids=seg, kv_segment_ids=seg, block_q=16, block_k=16)
    return jnp.sum(jnp.sin(out)), out

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
  want = jax.jit(grad)(q, k, v, bias)
  split = jax.sharding.NamedSharding(mesh, sharding.P(sharding.DATA_AXES, None, "model"))
  args = [jax.device_put(x, split) for x in (q, k, v)] + [bias]
  sharded = jax.jit(sharding.under_mesh(grad, mesh))
  got = sharded(*args)
  jaxpr = str(sharded.trace(*args).jaxpr)
  return jax.device_get(got), jax.device_get(want), "shard_map" in jaxpr


def _decode(kind):
  """The decode kernel (interpret mode) unsharded and on a 4x2 mesh (batch over data, kv
  heads over model; GQA groups of 2), and whether it shard_maps."""
  mesh = sharding.make_mesh(sharding.mesh_shape({"data": 4, "model": 2}))
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (4, 2, 4, 16))  # two queries per sequence (a short chunk)
  k, v = (jax.random.normal(key, (4, 40, 2, 16)) for key in keys[1:])
  decode = lambda q, k, v: decode_attention(q, k, v, kind=kind, q_offset=30, block_k=16)
  want = jax.jit(decode)(q, k, v)
  split = jax.sharding.NamedSharding(mesh, sharding.P(sharding.DATA_AXES, None, "model"))
  args = [jax.device_put(x, split) for x in (q, k, v)]
  sharded = jax.jit(sharding.under_mesh(decode, mesh))
  return (jax.device_get(sharded(*args)), jax.device_get(want),
          "shard_map" in str(sharded.trace(*args).jaxpr))


def _pallas_model_traces_shard_map(data_dir):
  """Whether a pallas ViT's train step on a 2x4 mesh calls the kernel per shard (traced only)."""
  config = _config(MODELS["vit"], data_dir, {"data": 4, "model": 2})
  config.model.attention_impl = "pallas"
  exp = experiment.load(config)
  fns = exp.fns()
  abstract = placement.abstract_state(fns, 0)
  shard = placement.shardings(exp.trainer, abstract, batch_fields=("batch_size",))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       data_lib.train_batches(exp.datasets, batch_size=exp.trainer.batch_size,
                                              num_steps=1, seed=0)[0])
  return "shard_map" in str(placement.jit_train_step(fns, shard).trace(abstract, batch).jaxpr)


class _Preempted(Exception):
  pass


def _train_and_evaluate(data_dir, root):
  """The ViT through attnlab.train on the combined mesh, stopped after step 2 (saved), then
  resumed on the tensor-parallel mesh to the end and scored by attnlab.evaluate there; the
  workdir as it was at step 2 is copied for the parent process (one device) to resume."""
  workdir, at_step_2 = os.path.join(root, "run"), os.path.join(root, "run_at_step_2")
  seen = {}

  def stop_after_2(step, state):
    if step == 2:  # checkpoint_every_steps=2: saved before this call
      seen["combined"] = _placement(state)
      raise _Preempted

  with pytest.raises(_Preempted):
    train.train_and_evaluate(_config(MODELS["vit"], data_dir, MESHES["combined"]), workdir,
                             on_step=stop_after_2)
  shutil.copytree(workdir, at_step_2)

  def keep_last(step, state):
    if step == STEPS:
      seen["state"], seen["resumed"] = jax.device_get(state), _placement(state)

  config = _config(MODELS["vit"], data_dir, MESHES["tensor_parallel"])
  result = train.train_and_evaluate(config, workdir, on_step=keep_last)
  evaluated = evaluate.evaluate(config, workdir, verbose=False)  # restores the split checkpoint
  return {"result": result, "evaluated": evaluated, "at_step_2": at_step_2, **seen,
          "train_records": [r for r in metrics.read_metrics(workdir) if r["split"] == "train"]}


STUDY = "configs/sample_efficiency/digits.py:quick"


def _study_group(data_dir, devices):
  """The quick digits study's first group, its cells side by side (vmap_cells=None) on `devices`."""
  config = configlib.load(STUDY)
  config.unlock()
  config.data.data_dir = data_dir
  study_cfg, exp_cfg = study.split_config(config)
  group = study.plan(study_cfg, exp_cfg)[0]
  setup = study.prepare(study_cfg, exp_cfg)[group.cells[0].kind]
  setup = dataclasses.replace(setup, vmap_cells=None, devices=devices)
  # The devices the stack uses at the start and after each cell finishes.
  used = [stack.cell_mesh(len(group.alive_at(step)), devices).size
          for step in sorted({0, *(b for b in group.budgets if b < max(group.budgets))})]
  return cells.train_group(group, setup), group.budgets, used


def _child(out_path, data_dir):
  jax.config.update("jax_numpy_rank_promotion", "raise")
  # Compiling dominates (as tests/conftest.py's fast_xla_compile); every run here shares it.
  jax.config.update("jax_disable_most_optimizations", True)
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  results = {"errors": _errors(data_dir),
             "pallas": {name: _pallas(*case) for name, case in PALLAS_CASES.items()},
             "pallas_model": _pallas_model_traces_shard_map(data_dir),
             "decode": {kind: _decode(kind) for kind in ("sigmoid", "softmax")},
             "train_and_evaluate": _train_and_evaluate(data_dir, os.path.dirname(out_path)),
             "study": {"split": _study_group(data_dir, None),
                       "one": _study_group(data_dir, jax.devices()[:1])},
             "data_dir": data_dir}
  for model, spec in MODELS.items():
    losses, state = _train(spec, data_dir, {}, jax.devices()[:1])
    results[model, "single"] = (losses, jax.device_get(state), None)
  for model, name in CASES:
    losses, state = _train(MODELS[model], data_dir, MESHES[name], None)
    results[model, name] = (losses, jax.device_get(state), _placement(state))
  results["vit", "combined"] = (None, None, results["train_and_evaluate"]["combined"])
  with open(out_path, "wb") as f:
    pickle.dump(results, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("sharding") / "results.pkl")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(NUM_DEVICES),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={NUM_DEVICES}"}
  code = ("import sys; sys.path.insert(0, 'tests'); import test_sharding; "
          "test_sharding._child(sys.argv[1], sys.argv[2])")
  proc = subprocess.run([sys.executable, "-c", code, out, data_dir], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(out, "rb") as f:
    return pickle.load(f)


# ----------------------------------------------------------------------------
# Sharded runs equal the single-device run.
# ----------------------------------------------------------------------------


# Parameters and Adam moments after STEPS steps, as a fraction of each array's
# scale. Measured on x86-64: <= 2.4e-6 with jax 0.12; 1.6e-5 (one element of
# the LM's 4096 embedding) with the jax 0.10.2 floor (CI stage 2), whose
# reduction order differs. A sharding that dropped part of a gradient sum moves
# them by ~lr per step (Adam), orders of magnitude above this bound.
STATE_TOLERANCE = 5e-5


def assert_close_to_scale(got, want, rtol):
  """|got - want| <= rtol * max|want|, array by array (Adam's step is ~lr whatever the gradient,
  so an element with a tiny gradient moves by ~lr either way: compare to the array's scale)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.max(np.abs(want)))


@pytest.mark.parametrize("model, mesh", CASES)
def test_sharded_run_equals_single_device_run(runs, model, mesh):
  single_losses, single_state, _ = runs[model, "single"]
  losses, state, _ = runs[model, mesh]
  # float32; only the order of the sums over the batch and split axes differs. Measured
  # (x86-64, jax 0.12): losses <= 2.6e-7 relative; parameters and moments: STATE_TOLERANCE.
  np.testing.assert_allclose(losses, single_losses, rtol=2e-6)
  assert int(state.step) == STEPS
  jax.tree.map(lambda a, b: assert_close_to_scale(a, b, STATE_TOLERANCE), state.params, single_state.params)
  jax.tree.map(lambda a, b: assert_close_to_scale(a, b, STATE_TOLERANCE), state.opt_state,
               single_state.opt_state)


@pytest.mark.parametrize("model, mesh", CASES + [("vit", "combined")])
def test_every_parameter_has_its_declared_sharding(runs, model, mesh):
  *_, placed = runs[model, mesh]
  splits = EXPECTED_SPLITS[mesh]
  assert len(placed) > 20
  split_any = False
  for path, (axes, mesh_shape, spec, shard_shape, shape) in placed.items():
    assert axes is not None and len(axes) == len(shape), path
    expected = tuple(splits.get(name, ()) for name in axes)
    expected = tuple(tuple(a for a in axes_ if mesh_shape[a] > 1) for axes_ in expected)
    got = tuple(() if s is None else (s,) if isinstance(s, str) else tuple(s) for s in spec)
    got += ((),) * (len(shape) - len(got))
    assert got == expected, (path, axes, spec)
    # The shard on each device really is that fraction of the array.
    expected_shard = tuple(n // int(np.prod([mesh_shape[a] for a in e]))
                           for n, e in zip(shape, expected))
    assert shard_shape == expected_shard, (path, shape, shard_shape)
    split_any |= shard_shape != shape
  assert split_any == bool(splits), "a preset that splits nothing, or data parallel that does"


def test_a_run_saved_on_one_mesh_resumes_on_another_as_on_one_device(runs):
  run = runs["train_and_evaluate"]
  single_losses, single_state, _ = runs["vit", "single"]
  # Steps 1-2 on data=2 x fsdp=2 x model=2 (saved at 2), step 3 on data=4 x model=2.
  assert [r["step"] for r in run["train_records"]] == [2, 3]  # log_every_steps=2, and the last
  np.testing.assert_allclose([r["loss"] for r in run["train_records"]], single_losses[1:],
                             rtol=2e-6)
  jax.tree.map(lambda a, b: assert_close_to_scale(a, b, STATE_TOLERANCE), run["state"].params,
               single_state.params)
  kernel = [v for k, v in run["resumed"].items() if k.endswith("['mlp']['fc_in']['kernel']")]
  assert {v[2] for v in kernel} == {(None, "model")}  # restored onto the new mesh's layout
  # evaluate.py restores the split checkpoint onto the mesh and scores what training scored.
  assert run["result"]["step"] == run["evaluated"]["step"] == STEPS
  np.testing.assert_allclose(run["evaluated"]["loss"], run["result"]["eval_loss"], rtol=1e-6)


def test_a_run_saved_on_8_devices_resumes_on_one(runs):
  # This process has one device; the checkpoint of step 2 holds arrays split 8 ways.
  assert jax.device_count() == 1
  config = _config(MODELS["vit"], runs["data_dir"], {})  # another mesh: run-neutral
  seen = {}

  def keep_last(step, state):
    if step == STEPS:
      seen["state"] = jax.device_get(state)

  workdir = runs["train_and_evaluate"]["at_step_2"]
  result = train.train_and_evaluate(config, workdir, on_step=keep_last)
  single_losses, single_state, _ = runs["vit", "single"]
  assert result["step"] == STEPS
  last = [r for r in metrics.read_metrics(workdir) if r["split"] == "train"][-1]
  assert last["step"] == STEPS
  np.testing.assert_allclose(last["loss"], single_losses[-1], rtol=2e-6)
  jax.tree.map(lambda a, b: assert_close_to_scale(a, b, STATE_TOLERANCE), seen["state"].params,
               single_state.params)
  jax.tree.map(lambda a, b: assert_close_to_scale(a, b, STATE_TOLERANCE), seen["state"].opt_state,
               single_state.opt_state)


def test_the_optimizer_state_is_split_like_the_parameters(runs):
  *_, placed = runs["vit", "fsdp"]
  kernel = [v for k, v in placed.items() if k.endswith("['mlp']['fc_in']['kernel']")]
  assert len(kernel) == 3  # the parameter, Adam's mu and nu
  assert {v[3] for v in kernel} == {(32 // NUM_DEVICES, 64)}


# ----------------------------------------------------------------------------
# Refused configs.
# ----------------------------------------------------------------------------


def test_a_batch_that_does_not_split_names_the_sizes_and_the_fix(runs):
  message = runs["errors"]["batch"]
  assert ("config.batch_size=12 does not split over the data axes (data=4 x fsdp=2 = 8 ways, on "
          "8 devices; the batch is split across them)") in message
  assert "a multiple of 8 (e.g. 8)" in message and "config.mesh" in message


def test_mesh_sizes_that_do_not_fit_the_devices_are_refused(runs):
  assert runs["errors"]["product"] == (
      "config.mesh (data=3 x fsdp=1 x model=2): the sizes multiply to 6, not the 8 devices. "
      "Give sizes whose product is 8, or set one axis to -1 (the rest of the devices).")
  assert "the other axes multiply to 3, which does not divide the 8 devices" in \
      runs["errors"]["rest"]


def test_a_parameter_the_mesh_cannot_split_is_named(runs):
  message = runs["errors"]["heads"]
  assert message.startswith("params/encoder/blocks/0/attn/key/bias: axis 'kv_heads' of size 2 "
                            "(shape (2, 16)) does not split over the mesh axes model=4."), message
  assert "config.sharding_rules.kv_heads=None (replicated)" in message


def _trainer(**fields):
  return experiment.TrainerConfig(model_name="vit", batch_size=8, eval_batch_size=8,
                                  total_steps=1, **fields)


def test_mesh_defaults_and_presets():
  assert _trainer().mesh == (("data", -1), ("fsdp", 1), ("model", 1))
  assert _trainer(mesh={"fsdp": -1}).mesh == (("data", 1), ("fsdp", -1), ("model", 1))
  assert _trainer(mesh={"model": 2}).mesh == (("data", -1), ("fsdp", 1), ("model", 2))
  assert sharding.resolve(_trainer(mesh={"model": 2}).mesh, 8) == {"data": 4, "fsdp": 1,
                                                                   "model": 2}
  rules = dict(_trainer(sharding_rules={"embed": None, "mlp": ["fsdp", "model"]}).sharding_rules)
  assert rules["embed"] == () and rules["mlp"] == ("fsdp", "model") and rules["heads"] == ("model",)
  hash(_trainer(mesh={"fsdp": -1}))  # frozen configs stay hashable


@pytest.mark.parametrize("fields, message", [
    ({"mesh": {"dta": 2}}, 'Unknown field config.mesh.dta. Did you mean "data"?'),
    ({"mesh": {"data": -1, "fsdp": -1}}, "only one axis may be -1"),
    ({"mesh": {"model": 0}}, r"config.mesh.model=0: expected a positive int, or -1"),
    ({"sharding_rules": {"emb": "fsdp"}}, 'config.sharding_rules.emb. Did you mean "embed"?'),
    ({"sharding_rules": {"mlp": "modle"}}, "'modle' is not a mesh axis. Did you mean \"model\"?"),
    ({"sharding_rules": {"mlp": 2}}, "config.sharding_rules.mlp=2: 2 is not a mesh axis."),
])
def test_bad_mesh_or_rules_are_refused_when_the_config_is_read(fields, message):
  with pytest.raises(configlib.ConfigError, match=message):
    _trainer(**fields)


def test_a_typo_in_the_new_top_level_fields_is_refused():
  config = configlib.load("configs/digits_vit.py:quick")
  config.unlock()
  config.mesg = {"data": -1}
  with pytest.raises(configlib.ConfigError, match='config.mesg. Did you mean "mesh"?'):
    experiment.ExperimentConfig.from_config(config)


def test_every_logical_axis_of_the_models_has_a_rule():
  names = set()
  for cfg in [models.ViTConfig(width=16, depth=1, num_heads=2, mlp_dim=32, num_classes=3,
                               image_size=8, patch_size=4, pool="tok", posemb="learned",
                               output_gate="elementwise", attention="sigmoid",
                               learn_sigmoid_bias=True, layer_scale=1.0,
                               scan_layers=True),
              models.ViTConfig(width=16, depth=1, num_heads=2, num_classes=3, image_size=8,
                               patch_size=4, attention="inline", inline_local=True),
              models.TransformerConfig(width=16, depth=1, num_heads=2, num_kv_heads=1,
                                       vocab_size=16, max_len=8, positions="learned",
                                       tie_embeddings=False, output_gate="headwise")]:
    build = models.ViT if isinstance(cfg, models.ViTConfig) else models.Transformer
    model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))  # noqa: B023
    names.update(n for axes in models.logical_axes(model).values() for n in axes)
  assert names <= set(axes_lib.DEFAULT_RULES), names - set(axes_lib.DEFAULT_RULES)


# ----------------------------------------------------------------------------
# The fused kernel on a mesh.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(PALLAS_CASES))
def test_pallas_kernel_under_shard_map_equals_the_unsharded_kernel(runs, case):
  got, want, shard_mapped = runs["pallas"][case]
  assert shard_mapped  # one kernel call per shard, not a gathered whole
  (got_loss, got_out), got_grads = got
  (want_loss, want_out), want_grads = want
  # Each shard's kernel sees whole rows and heads: the outputs are the same numbers; the
  # loss (a sum over shards) and the bias gradient (a sum over batch shards) sum in another
  # order (measured: 2.3e-6 and 3.8e-6 relative).
  np.testing.assert_array_equal(got_out, want_out)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for name, g, w in zip("qkvb", got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)
  if PALLAS_CASES[case][1] == "sigmoid":
    assert np.max(np.abs(want_grads[3])) > 0.1  # the bias gradient is not trivially 0


def test_a_pallas_model_on_a_mesh_calls_the_kernel_per_shard(runs):
  assert runs["pallas_model"]


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_the_decode_kernel_under_shard_map_equals_the_unsharded_kernel(runs, kind):
  got, want, shard_mapped = runs["decode"][kind]
  assert shard_mapped  # one decode kernel call per (batch, kv heads) shard
  # Each shard holds whole sequences and whole GQA groups: the kernel computes the same
  # partials; softmax's merge over splits (XLA, after the kernel) may round differently
  # inside shard_map (measured: 6e-8 absolute).
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(want)) > 0.1


# ----------------------------------------------------------------------------
# A study group's cells split over the devices.
# ----------------------------------------------------------------------------


def test_a_study_group_split_over_8_devices_gives_each_cell_what_one_device_gives(runs):
  split, budgets, used = runs["study"]["split"]
  one, _, used_one = runs["study"]["one"]
  # 4 cells (budgets 6, 6, 8, 8): on 4 devices, then the 2 left on 2; on one device, one.
  assert budgets == (6, 6, 8, 8) and used == [4, 2] and used_one == [1, 1]
  assert [(r.kind, r.n, r.seed) for r in split] == [(r.kind, r.n, r.seed) for r in one]
  for got, want in zip(split, one):
    # Each cell's numbers are its own program's, on whichever device: the same to float32
    # rounding (a program over 4 or 2 cells may order a reduction differently than over 4).
    assert (got.steps, got.best_step, got.diverged_at) == (want.steps, want.best_step, None)
    assert got.test_error == want.test_error and got.val_error == want.val_error
    np.testing.assert_allclose([got.train_loss, got.val_loss, got.test_loss],
                               [want.train_loss, want.val_loss, want.test_loss], rtol=2e-6)
