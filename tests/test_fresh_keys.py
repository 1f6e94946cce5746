"""Every repeated release draws from its own key.

A release repeated with one key (the Q feature-matching queries, the T_E
DP-SGD steps of the expert) would add the SAME noise and the same Poisson
sample each time: averaging the releases would then remove nothing of it,
and the accountant's composition of independent Gaussians would not hold.
(PE's T histograms: tests/test_pe.py, fresh noise of std sigma.)
"""

import types

import jax
import jax.numpy as jnp
import numpy as np

from dpgeng_jax import expert, mechanisms, noise, stages
from dpgeng_jax.models import ConvNet, init_params


def _key_words(key) -> tuple:
  return tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())


def test_each_expert_step_gets_its_own_key(monkeypatch):
  seen = []
  real = expert.private_step

  def spying_private_step(*a, **k):
    step, rows = real(*a, **k)

    def spy(params, *args):
      seen.append(_key_words(args[-1]))
      return step(params, *args)
    return spy, rows
  monkeypatch.setattr(expert, "private_step", spying_private_step)
  model = ConvNet(num_classes=2, width=4, depth=1)
  rng = np.random.default_rng(0)
  x = rng.random((12, 8, 8, 1)).astype(np.float32)
  y = (np.arange(12) % 2).astype(np.int32)
  params = init_params(model, jax.random.key(0), x.shape[1:])
  expert.dp_finetune(params, model, x, y,
                     cfg=expert.ExpertConfig(steps=4, sampling_rate=0.5),
                     noise_multiplier=1.0,
                     secret=noise.deterministic_secret_key(3))
  assert len(seen) == 4 and len(set(seen)) == 4


def test_each_feature_matching_query_gets_its_own_key(monkeypatch):
  """answer_queries hands query q the key fold_in(secret, q): a stand-in
  for the query that returns noise drawn from the key it is given gives
  Q different answers (the same answer Q times if the key were reused)."""
  def fake_noisy_targets(spec, data, params, aug_params, secret_q,
                         chunk_size=None, skip_padding=True):
    del data, params, aug_params, chunk_size, skip_padding
    return (noise.add_gaussian_noise(secret_q, jnp.zeros((spec.num_classes,
                                                          3)), 1.0),
            jnp.bool_(False))
  monkeypatch.setattr(mechanisms, "noisy_targets", fake_noisy_targets)
  cfg = types.SimpleNamespace(microbatch=0, num_queries=5, quiet=True,
                              no_skip_padding=False)
  spec = mechanisms.QuerySpec(
      embed_fn=lambda p, x: x.reshape(x.shape[0], -1), num_classes=2,
      clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.5, capacity=0)
  plan_q = types.SimpleNamespace(params=lambda k, q: ({}, {}),
                                 arrays=lambda: None)
  plan_q.with_arrays = lambda arrays: plan_q
  x = np.zeros((10, 4, 4, 1), np.float32)
  ds = types.SimpleNamespace(y_train=(np.arange(10) % 2).astype(np.int32))
  sizes = types.SimpleNamespace(padded_rows=12)
  targets, _ = stages.answer_queries(
      cfg, spec, plan_q, jax.random.key(0), x, ds,
      noise.deterministic_secret_key(4), None, sizes, None)
  flat = np.asarray(targets).reshape(5, -1)
  assert len({row.tobytes() for row in flat}) == 5


def test_each_private_mechanism_of_a_run_gets_its_own_key(monkeypatch,
                                                          tmp_path):
  """The class counts, the generator, the queries and the expert each get
  one of four independent secret keys. Handing one stage another's key (a
  review's mutation: the expert given the queries' key, so that query q and
  expert step q drew the same Poisson sample and noise words) passed every
  test before."""
  from dpgeng_jax import cli
  from test_cli import GEN_TINY, TINY
  seen = {}

  def spy(name):
    real = getattr(stages, name)

    def stage(*args, **kw):
      keys = [a for a in (*args, *kw.values()) if isinstance(a, jax.Array)
              and jnp.issubdtype(a.dtype, jax.dtypes.prng_key)]
      assert len(keys) == 1, name
      seen[name] = _key_words(keys[0])
      return real(*args, **kw)
    monkeypatch.setattr(stages, name, stage)
  for name in ("class_sizes", "generate", "query", "expert"):
    spy(name)
  assert cli.main(["distill", "--out", str(tmp_path / "run"), "--method",
                   "dpgeng", "--generator", "merf", "--deterministic",
                   "--no-eval", *GEN_TINY, *TINY]) == 0
  assert set(seen) == {"class_sizes", "generate", "query", "expert"}
  assert len(set(seen.values())) == 4, seen
