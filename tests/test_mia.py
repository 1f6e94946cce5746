"""Membership inference (dpgeng_jax/mia.py, `dpgeng mia`).

The metrics are checked on hand-computed cases; the attacks must find a
leak where there is one (a released set that IS the member set, memorised)
and nothing where there is none (a released set disjoint from the
candidates). Measured margins (seeds 0-3, 200 candidates, random labels):
the memorising target gives loss-attack AUC 0.90-0.98, the disjoint one
0.45-0.49 (standard deviation of the AUC under the null about 0.04).
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from dpgeng_jax import cli, data, mia
from dpgeng_jax.config import Config
from dpgeng_jax.evaluate import EvalConfig

RECORD_FIELDS = ("method", "epsilon", "attack", "auc", "tpr_at_1pct_fpr",
                 "tpr_at_01pct_fpr", "shadows", "members", "candidates",
                 "seconds")
TINY = ["--ipc", "2", "--eval-models", "1", "--eval-epochs", "2",
        "--eval-width", "8", "--extractor-width", "8", "--steps", "2",
        "--num-queries", "2", "--quiet"]


def _npz(path, n=48, k=4):
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8),
           y_train=np.arange(n) % k,
           x_test=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8),
           y_test=np.arange(12) % k)
  return f"npz:{path}"


# ---------------------------------------------------------------------------
# Metrics.


def test_perfect_separation_gives_auc_one_and_full_tpr_at_zero_fpr():
  labels = np.r_[np.ones(50), np.zeros(50)]
  scores = np.r_[np.linspace(2, 3, 50), np.linspace(0, 1, 50)]
  assert mia.roc_auc(scores, labels) == 1.0
  assert mia.tpr_at_fpr(scores, labels, 0.0) == 1.0
  assert mia.attack_metrics(scores, labels) == {
      "auc": 1.0, "tpr_at_1pct_fpr": 1.0, "tpr_at_01pct_fpr": 1.0}
  # Reversed scores: AUC 0, and no member is found below any FPR < 1.
  assert mia.roc_auc(-scores, labels) == 0.0
  assert mia.tpr_at_fpr(-scores, labels, 0.5) == 0.0


def test_identical_distributions_give_auc_near_half():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=20_000)
  labels = rng.integers(0, 2, 20_000)
  assert abs(mia.roc_auc(scores, labels) - 0.5) < 0.02  # sd 0.004
  assert mia.tpr_at_fpr(scores, labels, 0.01) < 0.02
  # All scores tied: one threshold, AUC exactly one half.
  assert mia.roc_auc(np.zeros(10), np.arange(10) % 2) == 0.5
  assert mia.tpr_at_fpr(np.zeros(10), np.arange(10) % 2, 0.5) == 0.0


def test_hand_computed_example():
  # Members score 0.9, 0.7, 0.6; non-members 0.8, 0.5, 0.4. Member > non-
  # member in 3 + 2 + 2 of 9 pairs.
  scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
  labels = [1, 0, 1, 1, 0, 0]
  assert mia.roc_auc(scores, labels) == pytest.approx(7 / 9)
  fpr, tpr, thr = mia.roc_curve(scores, labels)
  np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
  np.testing.assert_allclose(tpr, [0, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1])
  assert thr[0] == np.inf and thr[-1] == 0.4
  assert mia.tpr_at_fpr(scores, labels, 0.0) == pytest.approx(1 / 3)
  assert mia.tpr_at_fpr(scores, labels, 0.3) == pytest.approx(1 / 3)
  assert mia.tpr_at_fpr(scores, labels, 1 / 3) == pytest.approx(1.0)
  # Ties: (1, member) and (1, non-member) tie; the pair counts one half.
  assert mia.roc_auc([1, 1, 0], [1, 0, 0]) == pytest.approx(0.75)
  assert mia.tpr_at_fpr([1, 1, 0], [1, 0, 0], 0.4) == 0.0  # no tie-breaking
  assert mia.tpr_at_fpr([1, 1, 0], [1, 0, 0], 0.5) == 1.0


def test_auc_is_the_area_under_the_roc_curve_with_ties():
  rng = np.random.default_rng(1)
  scores = rng.integers(0, 5, 300).astype(float)  # many ties
  labels = (rng.random(300) < 0.3 + 0.1 * scores).astype(int)
  fpr, tpr, _ = mia.roc_curve(scores, labels)
  area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
  assert mia.roc_auc(scores, labels) == pytest.approx(area)


@pytest.mark.parametrize("scores,labels", [
    ([0.1, 0.2], [1, 1]), ([0.1, np.nan], [1, 0]), ([0.1], [1, 0]),
    ([0.1, 0.2], [2, 0])])
def test_metrics_reject_bad_input(scores, labels):
  with pytest.raises(ValueError):
    mia.roc_auc(scores, labels)


# ---------------------------------------------------------------------------
# Attacks.


def test_lira_uses_per_example_difficulty_and_handles_one_sided_examples():
  # Each candidate has its own level mu_i (spread 3) and membership adds 1
  # (noise 0.5): raw phi barely separates members, LiRA does.
  rng = np.random.default_rng(0)
  n, s = 2000, 8
  mu = rng.normal(0, 3, n)
  shadow_in = np.stack(list(mia.member_masks(5, n, s)))
  shadow_phi = mu + shadow_in + rng.normal(0, 0.5, (s, n))
  shadow_in[:, :10] = True  # never OUT
  shadow_in[:, 10:20] = False  # never IN
  members = mia.member_masks(6, n, 1)[0]
  target = mu + members + rng.normal(0, 0.5, n)
  scores = mia.lira_scores(target, shadow_phi, shadow_in)
  assert np.all(np.isfinite(scores))
  assert mia.roc_auc(scores, members) > 0.8
  assert mia.roc_auc(target, members) < 0.65


def test_member_sets_are_exact_halves_that_differ_across_shadows():
  masks = mia.member_masks(0, 101, 9)
  assert masks.shape == (9, 101) and masks.dtype == bool
  assert np.all(masks.sum(1) == 50)
  assert len({m.tobytes() for m in masks}) == 9
  # Public and reproducible: the same seed gives the same splits.
  np.testing.assert_array_equal(masks, mia.member_masks(0, 101, 9))
  assert not np.array_equal(masks, mia.member_masks(1, 101, 9))
  # Each example is IN in about half the shadows.
  assert 0.4 < mia.member_masks(0, 1000, 40).mean(0).mean() < 0.6


EVAL = EvalConfig(num_models=1, epochs=60, batch_size=64, width=8, depth=2,
                  strategy="none", learning_rate=0.05)


@pytest.fixture(scope="module")
def random_problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 4, 300)  # random labels: only memorisation helps
  return x, y, mia.member_masks(0, 200, 1)[0]


def test_loss_attack_detects_a_memorising_target(random_problem):
  x, y, members = random_problem
  cx, cy = x[:200], y[:200]
  loss, phi = mia.candidate_statistics(
      jax.random.key(0), cx[members], cy[members], cx, cy, num_classes=4,
      cfg=EVAL)
  assert mia.roc_auc(mia.loss_scores(loss), members) > 0.8
  assert mia.roc_auc(phi, members) > 0.8


def test_loss_attack_is_at_chance_on_a_target_that_never_saw_members(
    random_problem):
  x, y, members = random_problem
  loss, _ = mia.candidate_statistics(
      jax.random.key(0), x[200:], y[200:], x[:200], y[:200], num_classes=4,
      cfg=EVAL)
  assert abs(mia.roc_auc(mia.loss_scores(loss), members) - 0.5) < 0.15


def test_phi_is_the_stable_logit_of_the_true_class_probability():
  from dpgeng_jax.models import ConvNet, init_params
  model = ConvNet(3, width=8, depth=2)
  params = init_params(model, jax.random.key(0), (8, 8, 1))
  stacked = jax.tree.map(lambda a: a[None], params)
  x = np.random.default_rng(0).normal(size=(5, 8, 8, 1))
  y = np.array([0, 1, 2, 0, 1])
  loss, phi = mia.model_statistics(stacked, model, x, y, batch_size=3)
  p = np.asarray(jax.nn.softmax(model.apply({"params": params}, x)),
                 np.float64)[np.arange(5), y]
  np.testing.assert_allclose(loss, -np.log(p), rtol=1e-4)
  np.testing.assert_allclose(phi, np.log(p / (1 - p)), rtol=1e-4)


# ---------------------------------------------------------------------------
# The whole run and the command line.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  from dpgeng_jax import data
  return data.load_dataset(_npz(tmp_path_factory.mktemp("d") / "d.npz"))


def test_run_draws_target_and_shadows_with_their_own_splits_and_seeds(
    tiny, monkeypatch):
  # The release is replaced by a spy (a random real subset), so that this
  # test checks the orchestration and the records without distilling.
  calls = []
  real = mia.released_set

  def spy(cfg, ds, members, seed):
    calls.append((np.array(members), seed))
    return real(dataclasses.replace(cfg, method="random_real"), ds, members,
                seed)

  monkeypatch.setattr(mia, "released_set", spy)
  cfg = Config(method="ndpdc", ipc=2, eval_models=1, eval_epochs=2,
               eval_width=8, epsilon=5.0, seed=10, quiet=True)
  records = mia.run(cfg, shadows=3, seed=4, dataset=tiny, log=None)
  np.testing.assert_array_equal(np.stack([m for m, _ in calls]),
                                mia.member_masks(4, 48, 4))
  assert [seed for _, seed in calls] == [10, 11, 12, 13]
  assert [r.attack for r in records] == ["loss", "lira"]
  for r in records:
    assert (r.method, r.epsilon, r.private) == ("ndpdc", 5.0, True)
    assert (r.members, r.candidates, r.dataset) == (24, 48, tiny.name)
    assert 0 <= r.auc <= 1 and 0 <= r.tpr_at_01pct_fpr <= r.tpr_at_1pct_fpr
  assert (records[0].shadows, records[1].shadows) == (0, 3)
  assert records[0].seconds <= records[1].seconds


@pytest.mark.parametrize("kw", [{"init": "real"}, {"deterministic": True}])
def test_records_of_a_run_that_is_not_private_say_so(tiny, monkeypatch, kw):
  """mia.json called a dpgeng run initialised from real images private
  (only the method was looked at); it now uses privacy.json's reasons."""
  real = mia.released_set
  monkeypatch.setattr(mia, "released_set", lambda cfg, ds, m, seed: real(
      dataclasses.replace(cfg, method="random_real"), ds, m, seed))
  base = dict(method="ndpdc", ipc=2, eval_models=1, eval_epochs=2,
              eval_width=8, quiet=True)
  for extra, private in (({}, True), (kw, False)):
    records = mia.run(Config(**base, **extra), shadows=2, dataset=tiny,
                      log=None)
    assert {r.private for r in records} == {private}
    assert {r.epsilon for r in records} == {1.0 if private else None}


def test_mia_resolves_a_preset_as_distill_does():
  """--preset was recorded but its values were not applied."""
  argv = ["mia", "--preset", "quick", "--steps", "7", "--out", "x"]
  cfg = cli.mia_config(cli.build_parser().parse_args(argv), argv[1:])
  assert (cfg.steps, cfg.eval_epochs, cfg.extractor_width) == (7, 50, 32)
  assert cfg.out == Config().out  # --out is the attack's directory


def test_released_set_distills_the_members_only(tiny, monkeypatch):
  from dpgeng_jax import pipeline
  seen = []
  real = pipeline.run

  def spy(cfg, dataset=None, log=print):
    seen.append((cfg, dataset))
    return real(cfg, dataset=dataset, log=log)

  monkeypatch.setattr(pipeline, "run", spy)
  members = mia.member_masks(0, 48, 1)[0]
  cfg = Config(method="dm", ipc=2, steps=2, num_queries=2,
               extractor_width=8, strategy="none", quiet=True)
  x, y = mia.released_set(cfg, tiny, members, seed=3)
  (run_cfg, sub), = seen
  assert (run_cfg.seed, run_cfg.no_eval, run_cfg.method) == (3, True, "dm")
  np.testing.assert_array_equal(sub.x_train, tiny.x_train[members])
  np.testing.assert_array_equal(sub.y_train, tiny.y_train[members])
  assert (sub.mean, sub.std) == (tiny.mean, tiny.std)
  assert x.shape == (8, 8, 8, 1)
  np.testing.assert_array_equal(y, np.repeat(np.arange(4), 2))


def test_cli_writes_records_for_the_random_real_baseline(tmp_path, capsys):
  out = tmp_path / "mia"
  assert cli.main(["mia", "--method", "random_real", "--dataset",
                   _npz(tmp_path / "d.npz"), "--shadows", "2", "--out",
                   str(out), *TINY]) == 0
  records = json.loads((out / "mia.json").read_text())
  assert [r["attack"] for r in records] == ["loss", "lira"]
  for r in records:
    assert set(RECORD_FIELDS) <= set(r), r
    assert r["method"] == "random_real" and r["epsilon"] is None
    assert r["private"] is False
  printed = capsys.readouterr().out
  assert "TPR@0.1%FPR" in printed and "random_real" in printed
  # 24 non-members: below 1/24 FPR both columns are the TPR at FPR 0.
  assert "TPR at 0.1% and 1% FPR is the TPR at FPR 0" in printed


@pytest.mark.parametrize("flags,message", [
    (["--shadows", "1"], "shadows"),
    (["--method", "magic"], "unknown method"),
    (["--epsilon", "0"], "epsilon"),
    (["--ipc", "20"], "ipc"),
    (["--mia-seed", "-1"], "seed"),
])
def test_cli_rejects_bad_input_with_one_line_and_writes_nothing(
    tmp_path, capsys, flags, message):
  out = tmp_path / "mia"
  assert cli.main(["mia", "--method", "random_real", "--dataset",
                   _npz(tmp_path / "d.npz"), "--out", str(out), *TINY,
                   *flags]) == 2
  err = capsys.readouterr().err
  assert err.startswith("dpgeng: error:") and message in err, err
  assert len(err.strip().splitlines()) == 1
  assert not out.exists()


def test_cli_refuses_to_replace_mia_json_or_write_into_a_file(tmp_path,
                                                              capsys):
  out = tmp_path / "mia"
  out.mkdir()
  (out / "mia.json").write_text("[]")
  argv = ["mia", "--method", "random_real", "--dataset",
          _npz(tmp_path / "d.npz"), *TINY]
  assert cli.main([*argv, "--out", str(out)]) == 2
  assert "already holds" in capsys.readouterr().err
  assert (out / "mia.json").read_text() == "[]"
  (tmp_path / "file").write_text("x")
  assert cli.main([*argv, "--out", str(tmp_path / "file")]) == 2
  assert "not a directory" in capsys.readouterr().err


def test_mia_options_are_the_distill_options_plus_its_own():
  args = cli.build_parser().parse_args(["mia", "--ipc", "3", "--method",
                                        "dm"])
  assert (args.ipc, args.method, args.shadows, args.out) == (3, "dm", 8,
                                                            None)
  for f in dataclasses.fields(Config):
    assert hasattr(args, f.name) == (f.name not in (
        "no_eval", "references", "resume", "checkpoint_every")), f.name
  assert cli.mia_config(args) == dataclasses.replace(Config(), ipc=3,
                                                     method="dm")


def test_the_member_split_of_a_train_only_dataset_keeps_its_empty_test_split():
  """The attack reads no test split, so a train-only dataset will do
  (members_dataset refused it)."""
  rng = np.random.default_rng(0)
  ds = data.from_arrays(rng.random((12, 8, 8, 1)).astype(np.float32),
                        np.arange(12) % 3, None, None, require_test=False)
  sub = mia.members_dataset(ds, np.arange(12) < 6)
  assert sub.num_train == 6 and sub.x_test.shape == (0, 8, 8, 1)


def test_a_run_on_a_release_of_its_members_reports_the_leak(tiny,
                                                            monkeypatch):
  """The release is the member set itself (random_real with every member
  image): both attacks must find the members. With the membership labels
  or the shadows' IN/OUT inverted, every AUC read 1 - AUC ("no leak") and
  the tests passed (a review's mutations)."""
  real = mia.released_set
  monkeypatch.setattr(mia, "released_set", lambda cfg, ds, m, seed: real(
      dataclasses.replace(cfg, method="random_real", ipc=48), ds, m, seed))
  cfg = Config(method="ndpdc", ipc=2, eval_models=1, eval_epochs=60,
               eval_width=8, strategy="none", quiet=True)
  loss, lira = mia.run(cfg, shadows=4, dataset=tiny, log=None)
  assert loss.auc > 0.75 and lira.auc > 0.75, (loss, lira)


def test_the_tpr_columns_are_read_at_1_and_0_1_percent_fpr():
  rng = np.random.default_rng(1)
  labels = np.r_[np.ones(2000, bool), np.zeros(2000, bool)]
  scores = np.r_[rng.normal(1.5, 1.0, 2000), rng.normal(0.0, 1.0, 2000)]
  got = mia.attack_metrics(scores, labels)
  assert got["tpr_at_1pct_fpr"] == mia.tpr_at_fpr(scores, labels, 0.01)
  assert got["tpr_at_01pct_fpr"] == mia.tpr_at_fpr(scores, labels, 0.001)
  assert got["tpr_at_01pct_fpr"] < got["tpr_at_1pct_fpr"] < 0.5
  assert got["auc"] == mia.roc_auc(scores, labels)
