"""The run report (report.html and its figures) and `dpgeng report DIR`."""

import base64
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpgeng_jax import cli, evaluate, models, outputs, report
from dpgeng_jax.errors import ConfigError

from test_cli import GEN_TINY, TINY


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """One small dpgeng run (every mechanism, f = 2) published in a dir."""
  out = tmp_path_factory.mktemp("report") / "run"
  assert cli.main(["distill", "--out", str(out), "--method", "dpgeng",
                   "--tensorboard", str(out.parent / "tb"),
                   "--factor", "2", "--generator", "merf", "--deterministic",
                   "--epsilon", "4", *GEN_TINY, *TINY]) == 0
  return out


def _embedded_pngs(html: str) -> dict:
  found = re.findall(r"alt='([^']+)' src='data:image/png;base64,([^']+)'",
                     html)
  return {name: base64.b64decode(data) for name, data in found}


def test_report_names_every_mechanism_and_embeds_the_figures(finished_run):
  out = finished_run
  html = (out / "report.html").read_text()
  privacy = json.loads((out / "privacy.json").read_text())
  assert len(privacy["mechanisms"]) == 4
  for m in privacy["mechanisms"]:
    assert f"<td>{m['name']}</td>" in html, m["name"]
    assert f"{m['noise_multiplier']:.4g}" in html
  assert f"{privacy['epsilon_pld']:.4g}" in html
  assert "NO: " in html  # the deterministic test mode is not private
  pngs = _embedded_pngs(html)
  for name in ("grid.png", "decoded_grid.png", "init_grid.png",
               "generated_grid.png", "loss.png", "class_accuracy.png"):
    assert pngs[name][:8] == b"\x89PNG\r\n\x1a\n", name
    assert pngs[name] == (out / name).read_bytes(), name  # the same figure
  manifest = outputs.read_manifest(str(out))
  assert {"report.html", "loss.png"} <= set(manifest["files"])
  events = os.listdir(out.parent / "tb")  # --tensorboard
  assert len(events) == 1 and events[0].startswith("events.out.tfevents")
  assert "src='http" not in html and "src=\"http" not in html  # offline


def _table_rows(html, header):
  """{first cell: the other cells} of the report.html table whose header
  holds `header`."""
  import html as html_lib
  (table,) = [t for t in re.findall(r"<table>(.*?)</table>", html)
              if f"<th>{header}</th>" in t]
  rows = [[html_lib.unescape(c) for c in re.findall(r"<td>(.*?)</td>", tr)]
          for tr in re.findall(r"<tr>(.*?)</tr>", table)]
  return {r[0]: r[1:] for r in rows if r}


def test_report_tables_show_each_value_in_its_row_and_column(finished_run):
  """Each mechanism's row holds its own share, noise multiplier, rate,
  steps, sensitivity and epsilon alone; the composed rows hold PLD's and
  RDP's figures; the stage-time table holds measured / estimate. (Values
  in another mechanism's row, swapped columns, the composed epsilon in the
  per-mechanism column, or no timing table passed: the test looked for
  names and noise multipliers anywhere on the page.)"""
  out = finished_run
  html = (out / "report.html").read_text()
  privacy = json.loads((out / "privacy.json").read_text())
  config = json.loads((out / "config.json").read_text())
  rows = _table_rows(html, "noise multiplier")
  fmt = report._fmt
  for m in privacy["mechanisms"]:
    share = config.get(report.SHARES.get(m["name"], ""), "declared")
    assert rows[m["name"]] == [fmt(v) for v in (
        share, m["noise_multiplier"], m["sampling_rate"], m["steps"],
        m["l2_sensitivity"], m["epsilon_alone"])], m["name"]
  assert len({str(rows[m["name"]]) for m in privacy["mechanisms"]}) == 4
  composed = _table_rows(html, "composed")
  pld = [v for k, v in composed.items() if k.startswith("epsilon (PLD")]
  rdp = [v for k, v in composed.items() if k.startswith("epsilon (RDP")]
  assert pld == [[fmt(privacy["epsilon_pld"])]]
  assert rdp == [[fmt(privacy["epsilon_rdp"])]]
  assert "<h2>Stage timings</h2>" in html
  metrics = json.loads((out / "metrics.json").read_text())
  est = config["estimate"]["stages_s"]
  name = "distillation_s"
  measured, want = metrics["timings_s"][name], est[name]
  timings = _table_rows(html, "measured / estimate")
  assert timings["distillation"][:3] == [fmt(measured), fmt(want),
                                         fmt(measured / want)]


def test_dpgeng_report_rebuilds_the_report_of_a_finished_run(finished_run):
  out = finished_run
  before = (out / "report.html").read_text()
  for name in ("report.html", "grid.png", "loss.png"):
    os.remove(out / name)
  assert cli.main(["report", str(out)]) == 0
  after = (out / "report.html").read_text()
  assert _embedded_pngs(after).keys() == _embedded_pngs(before).keys()
  assert (out / "grid.png").read_bytes() == _embedded_pngs(after)["grid.png"]
  for m in json.loads((out / "privacy.json").read_text())["mechanisms"]:
    assert f"<td>{m['name']}</td>" in after


def test_report_of_a_directory_without_a_finished_run_is_an_error(tmp_path,
                                                                    capsys):
  assert cli.main(["report", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "no finished dpgeng run" in err and "--resume" not in err
  (tmp_path / ".dpgeng-staging").mkdir()  # a killed run
  assert cli.main(["report", str(tmp_path)]) == 2
  assert f"dpgeng distill --resume {tmp_path}" in capsys.readouterr().err
  assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
  assert "does not exist" in capsys.readouterr().err
  # A run still going (its lock held) is not called unfinished.
  rd = outputs.RunDirectory(str(tmp_path / "going"), overwrite=False,
                            names=("x",)).open()
  try:
    assert cli.main(["report", str(tmp_path / "going")]) == 2
    assert "still going" in capsys.readouterr().err
  finally:
    rd.close()
  (tmp_path / "going" / ".dpgeng-staging").mkdir(parents=True)
  assert cli.main(["report", str(tmp_path / "going")]) == 2
  assert "--resume" in capsys.readouterr().err


def test_amending_a_run_never_replaces_a_file_it_did_not_write(tmp_path):
  (tmp_path / "manifest.json").write_text(json.dumps(
      {"files": ["grid.png"], "tool": "dpgeng_jax"}))
  (tmp_path / "grid.png").write_bytes(b"ours")
  (tmp_path / "loss.png").write_bytes(b"the user's")
  with pytest.raises(ConfigError, match="loss.png"):
    outputs.amend_finished(str(tmp_path), {"grid.png": b"new",
                                           "loss.png": b"new"})
  assert (tmp_path / "loss.png").read_bytes() == b"the user's"
  assert (tmp_path / "grid.png").read_bytes() == b"ours"  # nothing written
  outputs.amend_finished(str(tmp_path), {"grid.png": b"new",
                                         "report.html": b"r"})
  assert (tmp_path / "grid.png").read_bytes() == b"new"
  assert outputs.read_manifest(str(tmp_path))["files"] == ["grid.png",
                                                            "report.html"]
  assert not (tmp_path / outputs.LOCK).exists()


def test_amending_a_locked_run_names_the_directory_not_an_option(tmp_path):
  """`dpgeng report DIR` takes the directory as an argument: a lock held
  by another process is reported without the distill option's name."""
  import fcntl
  (tmp_path / "manifest.json").write_text(json.dumps(
      {"files": ["grid.png"], "tool": "dpgeng_jax"}))
  with open(tmp_path / outputs.LOCK, "w") as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    with pytest.raises(ConfigError) as e:
      outputs.amend_finished(str(tmp_path), {"grid.png": b"new"})
  assert str(e.value).startswith(f"the run directory {str(tmp_path)!r} is "
                                 "in use by another run")
  assert "--out" not in str(e.value)


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_grid_cells_are_separated_by_white_gaps(shape):
  k, per = 3, 4
  x = np.zeros((k * per, *shape), np.float32)  # black images
  h = shape[0]
  cell = h * max(1, -(-48 // h))
  gap = max(2, cell // 12)
  img = report.canvas(x, k, per, cell, gap)
  assert img.shape == (k * (cell + gap) + gap, per * (cell + gap) + gap, 3)
  for r in range(k + 1):  # white rows between classes
    assert (img[r * (cell + gap):r * (cell + gap) + gap] == 255).all()
  assert (img[gap:gap + cell, gap:gap + cell] == 0).all()  # a black cell
  png = report.grid_png(x, k, "t", ["a", "b", "c"], per=per)
  assert png[:4] == b"\x89PNG"


def test_grid_groups_images_by_label_and_leaves_short_rows_white():
  # External generated data: any class sizes, any order (3, 1 and 0
  # images), each image in its own class's row; missing cells white.
  k, per, cell, gap = 3, 4, 8, 2
  x = np.stack([np.full((8, 8, 1), v, np.float32) for v in
                (0.0, 0.2, 0.4, 0.6)])
  labels = np.array([1, 0, 0, 0])
  img = report.canvas(x, k, per, cell, gap, labels)
  assert img.shape == (k * (cell + gap) + gap, 3 * (cell + gap) + gap, 3)
  def cell_value(r, j):
    y0, x0 = gap + r * (cell + gap), gap + j * (cell + gap)
    return np.unique(img[y0:y0 + cell, x0:x0 + cell])
  assert [cell_value(0, j).tolist() for j in range(3)] == [[51], [102],
                                                          [153]]
  assert cell_value(1, 0).tolist() == [0]
  assert cell_value(1, 1).tolist() == cell_value(2, 0).tolist() == [255]
  pngs = report.figures(x=np.zeros((3, 8, 8, 1)), y=np.arange(3),
                        x_generated=x, y_generated=labels)
  assert pngs["generated_grid.png"][:4] == b"\x89PNG"


def _spread_head(model, seed):
  """A model whose head has large random weights: its predictions spread
  over the classes (the initial head predicted one class for every
  image)."""
  one = models.init_params(model, jax.random.key(seed), (8, 8, 1))
  one["head"] = {"kernel": jnp.asarray(np.random.default_rng(seed).normal(
      size=one["head"]["kernel"].shape) * 3, jnp.float32),
                 "bias": jnp.zeros_like(one["head"]["bias"])}
  return one


@pytest.mark.parametrize("batch_size", [10, 37, 256])
def test_per_class_accuracies_match_a_direct_count(batch_size):
  model = models.ConvNet(4, width=8, depth=1, norm="instance")
  ones = [_spread_head(model, s) for s in (0, 5)]
  params = jax.tree.map(lambda *a: jnp.stack(a), *ones)
  x = np.asarray(jax.random.uniform(jax.random.key(1), (37, 8, 8, 1)))
  y = np.arange(37) % 3  # class 3 absent from the test split
  per_class = evaluate.class_accuracies(params, model, x, y,
                                        batch_size=batch_size)
  overall = evaluate.accuracies(params, model, x, y, batch_size=batch_size)
  for m, one in enumerate(ones):
    pred = np.argmax(np.asarray(model.apply({"params": one}, x)), -1)
    assert len(set(pred.tolist())) >= 3
    want = [np.mean(pred[y == c] == c) for c in range(3)]
    assert len(set(want)) == 3  # three different accuracies
    np.testing.assert_allclose(per_class[m, :3], want)
    assert np.isnan(per_class[m, 3])
    np.testing.assert_allclose(overall[m], np.mean(pred == y))
  assert not np.allclose(per_class[0, :3], per_class[1, :3])


def test_padded_test_rows_count_for_no_class():
  # A model that predicts class 0 for every image, on 11 images of one
  # class in batches of 4 (one padded row): 11 hits of 11 for class 0,
  # none for class 3. A padded row labelled 0 would add a twelfth hit.
  model = models.ConvNet(4, width=8, depth=1, norm="instance")
  one = models.init_params(model, jax.random.key(0), (8, 8, 1))
  one["head"] = {"kernel": jnp.zeros_like(one["head"]["kernel"]),
                 "bias": jnp.asarray([9.0, 0.0, 0.0, 0.0])}
  params = jax.tree.map(lambda a: a[None], one)
  x = np.asarray(jax.random.uniform(jax.random.key(1), (11, 8, 8, 1)))
  for y0 in (0, 3):
    y = np.full(11, y0)
    got = evaluate.class_accuracies(params, model, x, y, batch_size=4)
    np.testing.assert_array_equal(got[0, y0], 1.0 if y0 == 0 else 0.0)
    assert np.isnan(np.delete(got[0], y0)).all()


def _events(path):
  """The Event protos of a TensorBoard event file (TFRecord framing)."""
  import struct
  from tensorboardX.proto import event_pb2
  out = []
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    out.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
    i += 12 + n + 4
  return out


def test_tensorboard_events_hold_the_runs_scalars_and_figures(finished_run,
                                                              tmp_path):
  from dpgeng_jax import metric_writer, pipeline
  out = finished_run
  metrics = json.loads((out / "metrics.json").read_text())
  privacy = json.loads((out / "privacy.json").read_text())
  config = json.loads((out / "config.json").read_text())
  d = np.load(out / "distilled.npz")
  result = pipeline.RunResult(x=d["x"], y=d["y"], privacy=privacy,
                              metrics=metrics, config=config)
  (tmp_path / "tb").mkdir()
  (tmp_path / "tb" / "mine.txt").write_text("keep")
  path = metric_writer.write(str(tmp_path / "tb"), result, str(out))
  assert (tmp_path / "tb" / "mine.txt").read_text() == "keep"
  scalars, images = {}, set()
  for ev in _events(path):
    for v in ev.summary.value:
      if v.HasField("image"):
        images.add(v.tag)
      else:
        scalars.setdefault(v.tag, []).append((ev.step, v.simple_value))
  losses = metrics["distillation_losses"]
  assert [s for s, _ in scalars["distill/loss"]] == list(
      range(1, len(losses) + 1))
  np.testing.assert_allclose([v for _, v in scalars["distill/loss"]], losses,
                             rtol=1e-6)
  np.testing.assert_allclose(scalars["eval/test_accuracy_mean"][0][1],
                             metrics["test_accuracy_mean"], rtol=1e-6)
  for m in privacy["mechanisms"]:
    assert f"privacy/noise_multiplier/{m['name']}" in scalars
  assert {"figures/grid", "figures/loss"} <= images


def test_report_of_a_run_without_evaluation_still_builds(finished_run):
  privacy = json.loads((finished_run / "privacy.json").read_text())
  config = json.loads((finished_run / "config.json").read_text())
  page = report.html(privacy, config, None, {})
  assert "<td>test accuracy</td>" not in page and "<td>expert</td>" in page
  d = np.load(finished_run / "distilled.npz")
  pngs = report.figures(x=d["x"], y=d["y"], metrics=None)
  assert set(pngs) == {"grid.png"}


def test_report_of_a_run_with_a_damaged_json_file_is_a_one_line_error(
    finished_run, tmp_path, capsys):
  import shutil
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  (out / "metrics.json").write_text("{bad")
  assert cli.main(["report", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("dpgeng: error:") and "metrics.json" in err
  assert "Traceback" not in err


DAMAGED = {
    "privacy_a_list": ("privacy.json", "[]", "privacy.json holds an array"),
    "privacy_null": ("privacy.json", "null", "privacy.json holds null"),
    "config_a_number": ("config.json", "3", "config.json holds a number"),
    "mechanisms_a_string": ("privacy.json", '{"mechanisms": "x"}',
                            "privacy.json is not as the run wrote it"),
    "mechanisms_of_numbers": ("privacy.json", '{"mechanisms": [1, 2]}',
                              "privacy.json is not as the run wrote it"),
    "accuracy_a_string": ("metrics.json", '{"test_accuracy_mean": "x"}',
                          "cannot rebuild the report"),
    # np.load called it "pickled (object) data"
    "distilled_not_npz": ("distilled.npz", "junk",
                          "distilled.npz is not an npz file"),
    "privacy_missing": ("privacy.json", None, "privacy.json is missing"),
}


@pytest.mark.parametrize("name, text, message", DAMAGED.values(),
                         ids=DAMAGED.keys())
def test_report_of_run_files_that_are_not_the_runs_is_a_one_line_error(
    finished_run, tmp_path, capsys, name, text, message):
  """Valid JSON that is not the run's record (edited or damaged) ended in
  tracebacks ('list' object has no attribute 'get', string indices must
  be integers); nothing is written then."""
  import shutil
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  before = (out / "report.html").read_bytes()
  if text is None:
    (out / name).unlink()
  else:
    (out / name).write_text(text)
  assert cli.main(["report", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("dpgeng: error:") and message in err, err
  assert "Traceback" not in err and err.count("\n") == 1
  assert (out / "report.html").read_bytes() == before


def _huge_label(d):
  d["y"] = d["y"].copy()
  d["y"][-1] = 10 ** 8  # one grid row per class: 10^8 rows


def _gen_label_beyond(d):
  d["y_gen"] = d["y_gen"].copy()
  d["y_gen"][0] = 10 ** 8


def _nan_image(d):
  d["x"] = d["x"].copy()
  d["x"][0, 0, 0, 0] = np.nan


def _float_labels(d):
  d["y"] = d["y"].astype(np.float32)


CRAFTED = {
    "label_1e8": ("distilled.npz", _huge_label, "labels that are not "
                  "class-major"),
    "generated_label_1e8": ("stages/generate/arrays.npz", _gen_label_beyond,
                            "labels in [0, 100000000], outside [0, "),
    "nan_image": ("distilled.npz", _nan_image, "non-finite"),
    "float_labels": ("distilled.npz", _float_labels, "dtype float32"),
}


@pytest.mark.parametrize("name, edit, message", CRAFTED.values(),
                         ids=CRAFTED.keys())
def test_report_of_crafted_run_arrays_is_a_one_line_error(
    finished_run, tmp_path, capsys, name, edit, message):
  """Arrays that are not as the run writes them are refused before any
  figure is drawn: a label of 10^8 made the report allocate grid rows for
  10^8 classes."""
  import shutil
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  before = (out / "report.html").read_bytes()
  with np.load(out / name) as z:
    d = {k: z[k] for k in z.files}
  edit(d)
  np.savez(out / name, **d)
  assert cli.main(["report", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("dpgeng: error:") and message in err, err
  assert "Traceback" not in err and err.count("\n") == 1
  assert (out / "report.html").read_bytes() == before


def test_report_refuses_an_npz_that_expands_beyond_memory(
    finished_run, tmp_path, capsys, monkeypatch):
  """The zip directory's uncompressed sizes are checked before any array
  is read (a few kilobytes of compressed zeros can expand to gigabytes);
  shown with the machine's memory made smaller than distilled.npz."""
  import shutil
  from dpgeng_jax import data as data_lib
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  size = (out / "distilled.npz").stat().st_size
  monkeypatch.setattr(data_lib, "physical_memory", lambda: size // 2)
  assert cli.main(["report", str(out)]) == 2
  err = capsys.readouterr().err
  assert "distilled.npz holds" in err and "more than this machine's " \
      "memory" in err and "Traceback" not in err
  monkeypatch.setattr(data_lib, "physical_memory", lambda: 64 * size)
  assert cli.main(["report", str(out)]) == 0


def test_a_tensorboard_path_that_is_a_file_is_refused_before_any_work(
    tmp_path, capsys, monkeypatch):
  from dpgeng_jax import data
  monkeypatch.setattr(data, "load_dataset",
                      lambda *a, **k: pytest.fail("the data was read"))
  (tmp_path / "tb").write_text("mine")
  assert cli.main(["distill", "--out", str(tmp_path / "run"),
                   "--tensorboard", str(tmp_path / "tb"), *TINY]) == 2
  assert "--tensorboard" in capsys.readouterr().err
  assert (tmp_path / "tb").read_text() == "mine"
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("inside", ["stages", "stages/tb", ".dpgeng-staging/tb",
                                    "report.html"])
def test_a_tensorboard_path_inside_the_run_s_own_outputs_is_refused(
    tmp_path, capsys, monkeypatch, inside):
  """Events written into --out/stages (the tool's folder) were deleted by
  the next --overwrite there: refused before any work. A folder of its
  own inside --out is fine (the finished_run fixture writes beside it)."""
  from dpgeng_jax import data
  monkeypatch.setattr(data, "load_dataset",
                      lambda *a, **k: pytest.fail("the data was read"))
  out = tmp_path / "run"
  assert cli.main(["distill", "--out", str(out), "--tensorboard",
                   str(out / inside), *TINY]) == 2
  err = capsys.readouterr().err
  assert "--tensorboard" in err and "which this tool writes" in err
  assert not out.exists()


@pytest.mark.parametrize("shape,k,per,names", [
    ((8, 8, 1), 4, 2, None),  # two narrow columns under a long title
    ((16, 24, 3), 2, 1, ["a class name of thirty letters", "b"]),
    ((8, 8, 1), 2, 1, ["WWWWWWWWWWWW", "MMMM"]),  # wide capitals
    ((32, 32, 3), 10, 10, None)])
def test_a_grid_s_title_and_class_names_lie_inside_the_figure(shape, k, per,
                                                            names):
  """A run at IPC 2 cut its grid's title at both sides (the figure was as
  wide as two cells); long class names were cut at the left."""
  x = np.zeros((k * per, *shape), np.float32)
  fig = report.grid_figure(x, k, "DISTILLED SET (2 STORED IMAGES PER CLASS, "
                           "F = 2)", names, per=per)
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  renderer = canvas.get_renderer()
  width, height = fig.bbox.width, fig.bbox.height
  texts = list(fig.texts) + list(fig.axes[0].get_yticklabels())
  assert len(texts) == 1 + k
  for t in texts:
    box = t.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= width, t.get_text()
    assert box.y0 >= 0 and box.y1 <= height, t.get_text()


def test_figures_of_many_classes_show_the_first_hundred_and_say_so():
  """300 classes made 15000-pixel grids; now the first MAX_CLASSES_SHOWN
  rows (the title names the range) and a bar plot of bounded width."""
  k, cap = 150, report.MAX_CLASSES_SHOWN
  x = np.zeros((2 * k, 6, 6, 3), np.float32)
  fig = report.grid_figure(x, k, "distilled set", per=2)
  assert len(fig.axes[0].get_yticklabels()) == cap
  assert f"of {k}" in fig.texts[0].get_text().replace("\n", " ")
  small = report.grid_figure(x[:2 * cap], cap, "distilled set", per=2)
  # The same rows drawn (the title may take another line).
  assert fig.axes[0].bbox.height == small.axes[0].bbox.height
  import io
  from PIL import Image
  hist = np.zeros((2, k, 2, 6, 6, 3), np.float32)
  tall = Image.open(io.BytesIO(report.iterations_png(hist))).size[1]
  capped = Image.open(io.BytesIO(report.iterations_png(hist[:, :cap]))
                      ).size[1]
  assert capped <= tall <= capped + 3 * 15  # the title's lines at most
  acc = Image.open(io.BytesIO(report.class_accuracy_png(
      np.full((1, 300), 0.5).tolist()))).size
  assert acc[0] <= 28 * cap + 120


@pytest.mark.parametrize("private,accountant,pld,rdp", [
    (True, "pld", "the guarantee", "cross-check"),
    (True, "rdp", "cross-check", "the guarantee"),
    (False, "pld", "its mechanisms alone, NOT a guarantee",
     "its mechanisms alone, NOT a guarantee")])
def test_the_report_names_the_guarantee_only_where_the_run_has_one(
    private, accountant, pld, rdp):
  """The composed table calls the accountant's figure the guarantee (RDP
  below PLD's delta range) and, for a run that is not private, neither."""
  privacy = {"private": private, "accountant": accountant,
             "not_private_because": [] if private else ["no noise"],
             "target_epsilon": 1.0, "delta": 1e-5, "epsilon_pld": 0.99,
             "epsilon_rdp": 1.2, "mechanisms": []}
  page = report.html(privacy, {"resolved": {}}, None, {})
  assert f"epsilon (PLD, {pld})" in page
  assert f"epsilon (RDP, {rdp})" in page
  assert ("the guarantee" in page) == private


def _edited(field, value):
  def edit(p):
    p[field] = value
  return edit


def _noise_edited(p):
  p["mechanisms"][1]["noise_multiplier"] *= 10


EDITED = {
    "headline": (_edited("epsilon", 0.5), "epsilon 0.5 is not its "
                 "accountant's figure"),
    "every_figure": (lambda p: p.update(epsilon=0.5, epsilon_pld=0.5,
                                        epsilon_rdp=0.5),
                     "epsilon_pld 0.5 where its mechanisms give"),
    "a_noise_multiplier": (_noise_edited, "where its mechanisms give"),
    "target": (_edited("target_epsilon", 40.0),
               "target_epsilon 40.0 is not config.json's epsilon 4"),
    "delta": (_edited("delta", 1e-3), "is not the sum of its parts"),
    "meets_target": (_edited("meets_target", True), "meets_target True "
                     "where its figures give False"),
    "a_mechanisms_epsilon_alone": (
        lambda p: p["mechanisms"][2].update(epsilon_alone=0.01),
        "epsilon_alone 0.01 where its parameters give"),
}


@pytest.mark.parametrize("edit, message", EDITED.values(), ids=EDITED.keys())
def test_report_of_an_edited_privacy_record_is_refused(
    finished_run, tmp_path, capsys, edit, message):
  """`dpgeng report` repeated a privacy.json whose epsilon was set to 0.5
  by hand as the run's guarantee (a review's finding); its figures are
  recomputed from its mechanisms and its target compared with
  config.json's."""
  import shutil
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  privacy = json.loads((out / "privacy.json").read_text())
  assert len(privacy["mechanisms"]) == 4
  edit(privacy)
  (out / "privacy.json").write_text(json.dumps(privacy))
  assert cli.main(["report", str(out)]) == 2
  err = capsys.readouterr().err
  assert "privacy.json is not as the run wrote it" in err and message in err, (
      err)


def test_check_report_accepts_the_records_privacy_report_writes():
  from dpgeng_jax import accounting
  mechs = [accounting.Mechanism("class_counts", 20.0, 1.0, 1, "1"),
           accounting.Mechanism("queries", 5.0, 0.5, 40)]
  common = dict(target_epsilon=1.0, public_metadata=[], private=True)
  for kw in (dict(delta=1e-5, split=accounting.DeltaSplit(1e-5)),
             dict(delta=1e-5, external=(0.2, 1e-7),
                  split=accounting.DeltaSplit(1e-5, 1e-7)),
             dict(delta=1e-11, split=accounting.DeltaSplit(1e-11)),  # rdp
             dict(delta=1e-5)):
    rec = json.loads(json.dumps(accounting.privacy_report(mechs, **common,
                                                          **kw)))
    assert accounting.check_report(rec) == [], kw
  rec["epsilon_rdp"] *= 0.9
  assert accounting.check_report(rec)[0].startswith("epsilon_rdp")
  rec = accounting.privacy_report(mechs, **common, delta=1e-5)
  rec["mechanisms"][0]["epsilon_alone"] /= 2
  assert accounting.check_report(rec) == [
      f"class_counts's epsilon_alone {rec['mechanisms'][0]['epsilon_alone']}"
      f" where its parameters give "
      f"{2 * rec['mechanisms'][0]['epsilon_alone']}"]


def test_check_report_checks_what_the_abort_events_add_to_delta(
    finished_run):
  """A run whose capacities and bounds were sized for one abort event where
  it has many (tau events times too large) adds more delta than it
  reserved: check_report, and so `dpgeng report`, refuse its record (a
  review's mutation of stages.calibrate passed every test before)."""
  import copy
  import math
  from dpgeng_jax import accounting
  rec = json.loads((finished_run / "privacy.json").read_text())
  abort = rec["abort_events"]
  assert abort["events"] > 1 and accounting.check_report(rec) == []
  assert abort["delta_added"] == pytest.approx(rec["delta_abort_events"],
                                               rel=1e-6)
  one = copy.deepcopy(rec)
  one["abort_events"]["probability_per_event"] *= abort["events"]
  one["abort_events"]["delta_added"] = accounting.failure_delta(
      rec["target_epsilon"], abort["events"],
      math.log(one["abort_events"]["probability_per_event"]))
  assert [p for p in accounting.check_report(one)
          if "more than the" in p and "reserved" in p]
  edited = copy.deepcopy(rec)
  edited["abort_events"]["delta_added"] /= 2
  assert [p for p in accounting.check_report(edited)
          if p.startswith("abort_events' delta_added")]


def test_report_never_copies_a_planted_link_fifo_or_non_png_into_the_run(
    finished_run, tmp_path, capsys):
  """A figure the report cannot redraw is copied from the run: a link
  planted in its place (to a secret file) was read and its bytes embedded
  in report.html and saved in the run; a FIFO as privacy.json hung the
  command. Each is refused in one line, before anything is written."""
  import shutil
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  secret = tmp_path / "secret.txt"
  secret.write_bytes(b"someone's private key")
  manifest = json.loads((out / "manifest.json").read_text())
  name = "generator_iterations.png"  # a DP-MERF run draws none
  assert name not in manifest["files"]
  manifest["files"].append(name)
  (out / "manifest.json").write_text(json.dumps(manifest))
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  os.symlink(secret, out / name)
  assert cli.main(["report", str(out)]) == 2
  assert "is not a regular file" in capsys.readouterr().err
  os.remove(out / name)
  (out / name).write_bytes(b"someone's private key")
  assert cli.main(["report", str(out)]) == 2
  assert "is not a PNG image" in capsys.readouterr().err
  os.remove(out / name)
  os.remove(out / "privacy.json")
  try:
    os.mkfifo(out / "privacy.json")
  except OSError:
    pytest.skip("this file system has no FIFOs")
  assert cli.main(["report", str(out)]) == 2
  assert "privacy.json is not a regular file" in capsys.readouterr().err
  after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  assert {p: b for p, b in after.items() if p.name != "privacy.json"} == {
      p: b for p, b in before.items() if p.name != "privacy.json"}


def test_report_of_deeply_nested_or_overflowing_json_is_one_line(
    finished_run, tmp_path, capsys):
  """Crafted records ended in a traceback (RecursionError, OverflowError);
  each is now a one-line refusal, status 2."""
  import shutil
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  good = (out / "metrics.json").read_text()
  for text in ("[" * 100000 + "]" * 100000,
               good.replace('"test_accuracy_mean": ',
                            '"test_accuracy_mean": 1' + "0" * 400 + ", "
                            '"_": ', 1)):
    (out / "metrics.json").write_text(text)
    assert cli.main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpgeng: error:") and "Traceback" not in err


def test_report_over_a_folder_in_an_outputs_place_writes_nothing(
    finished_run, tmp_path, capsys):
  """A folder where report.html was: the rebuild had rewritten the PNGs
  and then failed, leaving them out of step with report.html and the
  manifest; it is refused before any write."""
  import shutil
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  os.remove(out / "report.html")
  (out / "report.html").mkdir()
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
  assert cli.main(["report", str(out)]) == 2
  assert "holds folders named report.html" in capsys.readouterr().err
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*")
          if p.is_file()} == before
