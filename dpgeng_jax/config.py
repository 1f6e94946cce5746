"""The run configuration: one flat, frozen dataclass with a default and a
help string for every field. The command line is generated from it, and the
resolved values are saved as config.json.

Fields are grouped by what they touch (as jax_privacy keeps privacy and
performance configuration apart):

* `privacy`: change the guarantee (they enter the accountant, or make the
  run not private);
* `method`: the data, the method and its post-processing: they change the
  releases or what is computed from them, not the accountant;
* `performance`: how the same computation runs (devices, memory, kernels):
  they must not change the guarantee or any release;
* `evaluation`: how the result is tested (never part of a release;
  `references` makes the run not private);
* `output`: where and how results are written.

A resumed run (--resume) may change `performance`, `evaluation` (except
`references`) and `output` options only: `resume_free_fields`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpgeng_jax.winograd import IMPLS as CONV_IMPLS

METHODS = ("ndpdc", "dpgeng", "generator", "dm")
INITS = ("auto", "noise", "real", "generated")
CENTRES = ("auto", "generated", "none")
EXTRACTORS = ("auto", "random", "generated")


def _f(default, help_text: str, group: str, choices=None):
  meta = {"help": help_text, "group": group}
  if choices is not None:
    meta["choices"] = choices
  return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Config:
  """Every option of `dpgeng distill` (and of `dpgeng_jax.run`)."""
  # Data and method.
  dataset: str = _f("digits", "dataset spec: digits | npz:PATH | "
                    "tfds:NAME[:TRAIN[:TEST]]", "method")
  preset: str = _f("", "preset protocol(s), comma-separated, applied "
                   "left to right under the options given explicitly: "
                   "mnist, fashion_mnist, cifar10, cifar100, celeb_a "
                   "(the paper's protocol on the TFDS dataset), quick (a "
                   "reduced protocol for CPUs); see dpgeng_jax/presets.py",
                   "method")
  label_feature: str = _f("label", "TFDS feature holding the label; a "
                          "path such as attributes/Male picks a nested "
                          "(boolean) attribute", "method")
  image_size: int = _f(0, "resize every image to SIZE x SIZE (centre "
                       "crop to a square, then linear resizing with "
                       "antialiasing; public "
                       "preprocessing; 0: as stored)", "method")
  data_dir: str = _f("", "TFDS data directory; empty means TFDS_DATA_DIR "
                     "or ~/tensorflow_datasets", "output")
  num_classes: int = _f(0, "number of classes K, public metadata (0: from "
                        "the dataset: 10 for digits, the TFDS label "
                        "feature, for npz the largest training label + 1; "
                        "the report says which)", "method")
  method: str = _f("dpgeng", "dpgeng: DP-generated data for the init "
                   "and the queries' centres, DP feature matching (and, "
                   "asked for, generated extractors and the DP expert); "
                   "ndpdc: random extractors, noise init (DP); generator: "
                   "IPC images per class selected from the DP-generated "
                   "data by k-means; dm: distribution matching, NOT "
                   "private", "method", choices=METHODS)
  init: str = _f("auto", "initialisation of the synthetic set (auto: "
                 "generated for dpgeng, real for dm, noise for ndpdc)",
                 "method", choices=INITS)
  extractors: str = _f("auto", "extractor pool of the queries (auto: "
                       "random, a fresh random ConvNet per query, measured "
                       "better than ConvNets trained on generated data; "
                       "generated: the pool trained on it)", "method",
                       choices=EXTRACTORS)
  centre_features: str = _f(
      "auto", "subtract a public centre from each query's embeddings before "
      "clipping (generated: the generated data's mean embedding under the "
      "same extractor and augmentation; none: as NDPDC; auto: generated "
      "for dpgeng, none otherwise; dpgeng_jax/extractors.py)", "method",
      choices=CENTRES)
  factor: int = _f(0, "multi-formation factor f in {1, 2} (0: 2 for images "
                   ">= 16 px, else 1)", "method")
  generator: str = _f("pe:text", "DP generator: pe:text (Private "
                      "Evolution over the text simulator), pe:nearest:PATH "
                      "(PE over a public labelled image collection, npz x, "
                      "y), merf (DP-MERF, no public prior; 'builtin' is an "
                      "alias) or npz:PATH (images x, y made by any DP "
                      "generator, with a declared guarantee)", "method")
  ipc: int = _f(10, "synthetic images per class", "method")
  out: str = _f("dpgeng_out", "output directory", "output")
  # Privacy.
  epsilon: float = _f(1.0, "target epsilon of the whole run", "privacy")
  delta: float = _f(1e-5, "target delta (must be < 1/N)", "privacy")
  clip_norm: float = _f(1.0, "per-example L2 bound C on embeddings",
                        "privacy")
  sampling_rate: float = _f(0.5, "Poisson sampling rate p of each "
                            "feature-matching query", "privacy")
  num_queries: int = _f(40, "number Q of cached noisy feature-matching "
                        "queries (40 and a feature share of 2 chosen by "
                        "benchmarks/draws.py sweeps with PE, "
                        "benchmarks/RESULTS.md)", "privacy")
  share_generator: float = _f(1.0, "budget share of the generator's "
                              "releases (GDP units)", "privacy")
  share_features: float = _f(2.0, "budget share of the feature-matching "
                             "queries (GDP units)", "privacy")
  share_expert: float = _f(1.0, "budget share of the DP expert "
                           "(GDP units)", "privacy")
  share_counts: float = _f(0.1, "budget share of the class-count release "
                           "(GDP units); not used with "
                           "--public-class-sizes", "privacy")
  public_class_sizes: bool = _f(
      False, "declare the class sizes public knowledge (a published "
      "benchmark split): use them exactly instead of releasing them with "
      "noise; privacy.json says so", "privacy")
  expert_steps: int = _f(10, "DP-SGD steps T_E of the expert (few large "
                         "batches: see benchmarks/expert_sweep.py)",
                         "privacy")
  expert_sampling_rate: float = _f(0.5, "Poisson rate q_E of the expert's "
                                   "DP-SGD", "privacy")
  expert_clip_norm: float = _f(1.0, "per-example gradient bound C_E",
                               "privacy")
  generated_epsilon: float = _f(0.0, "declared epsilon of external "
                                "generated data (with --generated-delta)",
                                "privacy")
  generated_delta: float = _f(0.0, "declared delta of external generated "
                              "data", "privacy")
  generated_mu: float = _f(0.0, "declared Gaussian-DP mu of external "
                           "generated data", "privacy")
  generated_noise_multiplier: float = _f(
      0.0, "declared noise multiplier of external generated data (with "
      "--generated-sampling-rate and --generated-steps)", "privacy")
  generated_sampling_rate: float = _f(1.0, "declared Poisson rate of "
                                      "external generated data", "privacy")
  generated_steps: int = _f(1, "declared number of noisy steps of external "
                            "generated data", "privacy")
  # Private Evolution (--generator pe:...).
  pe_iterations: int = _f(10, "PE iterations T: T noisy histogram releases "
                          "(the accountant composes T Gaussians; 0 with "
                          "--pe-warm-start: the warm start alone, no "
                          "votes)", "privacy")
  pe_public_only: bool = _f(
      False, "PE without votes (the public-only ablation): the same loop "
      "with uniform draws; reads no private data and spends no budget",
      "privacy")
  pe_population: int = _f(100, "PE population N_s per class (the images "
                          "voted on in each iteration)", "method")
  pe_threshold: float = _f(1.0, "PE threshold H in noise standard "
                           "deviations: counts max(h~ - H sigma, 0)",
                           "method")
  pe_k: int = _f(4, "PE votes per private example (its k nearest, weight "
                 "1/sqrt(k) each)", "method")
  pe_vote_tau: float = _f(0.0, "PE soft votes: 0 (default) gives each "
                         "of an example's k votes 1/sqrt(k); tau > 0 "
                         "weighs its k nearest by exp(-(d_j - d_1) / (tau "
                         "(d_k - d_1))), scaled to L2 norm 1 (the same "
                         "sensitivity)", "method")
  pe_warm_start: int = _f(0, "PE warm start (ours): > 0 spends a part of "
                          "PE's budget on one DP-MERF-style release of the "
                          "class means of random features of the pixels, "
                          "then moves the first population towards them "
                          "over this many public herding iterations before "
                          "the votes (0: off)", "privacy")
  pe_warm_weight: int = _f(5, "PE warm start: its release counts as this "
                           "many of PE's histogram releases (noise sigma / "
                           "sqrt(m); the accountant composes T + m "
                           "Gaussians)", "privacy")
  pe_start_degree: float = _f(1.0, "PE: degree of the votes' first "
                              "variation, falling linearly to 0 (below 1 "
                              "after a warm start: small moves from a "
                              "population already close)", "method")
  pe_lookahead: int = _f(0, "PE lookahead L: a candidate's embedding is "
                         "the mean over L of its variations (0: off)",
                         "method")
  pe_embedding: str = _f("random", "PE's public embedding for the votes: "
                         "pixels, random (a random ConvNet's features) or "
                         "trained (a ConvNet trained on the API's samples)",
                         "method", choices=("pixels", "random", "trained"))
  pe_width: int = _f(64, "width of PE's embedding ConvNet (random or "
                     "trained)", "method")
  pe_texts: str = _f("", "text API: comma-separated text of every class "
                     "(default the class index as a digit; a text cannot "
                     "hold a comma)", "method")
  pe_font_dir: str = _f("", "text API: a directory of extra .ttf/.otf fonts "
                        "(besides matplotlib's)", "method")
  pe_stroke_fonts: bool = _f(False, "text API: also draw with the Hershey "
                             "single-stroke fonts (pen paths drawn with a "
                             "pen width of the simulator's: handwriting-"
                             "like; measured no gain on our digits)",
                             "method")
  pe_marks: int = _f(2, "text API: straight strokes a variation may add "
                     "to or erase from a glyph (up to this many per image, "
                     "at most 16; "
                     "the votes keep the useful ones, such as a crossed 7; "
                     "0: glyphs only)", "method")
  pe_polarity: str = _f("light", "text API: light ink on a dark ground, "
                        "dark on light, or both", "method",
                        choices=("light", "dark", "both"))
  pe_nearest_k: int = _f(10, "nearest API: neighbours of the first "
                         "variation (k shrinks to 1 over the iterations)",
                         "method")
  # Generated data and extractors (post-processing).
  generator_features: int = _f(500, "random Fourier features D of "
                               "DP-MERF", "method")
  generator_steps: int = _f(2000, "training steps of DP-MERF's generator",
                            "method")
  generated_per_class: int = _f(200, "generated images per class to "
                                "sample (k-means pool)", "method")
  pool_models: int = _f(2, "ConvNets trained on generated data for the "
                        "extractor pool (with --extractors generated; "
                        "otherwise one, for the k-means init)", "method")
  pool_checkpoints: int = _f(2, "checkpoints kept per pool ConvNet",
                             "method")
  pool_epochs: int = _f(30, "training epochs of each pool ConvNet",
                        "method")
  # Expert (post-processing of its DP fine-tuning).
  expert: bool = _f(False, "dpgeng with DP-GenG's third term, the DP "
                    "expert (off by default: on digits it did not help at "
                    "epsilon 1 and cost a point at 10, and its share goes to "
                    "the other mechanisms; README 'Results', the rows "
                    "with --expert)", "method")
  expert_lr: float = _f(0.2, "learning rate of the expert's DP-SGD (SGD, "
                        "momentum 0.9)", "method")
  expert_weight: float = _f(0.1, "weight lambda of the expert term",
                            "method")
  expert_tau: float = _f(1.0, "temperature tau of the expert term",
                         "method")
  expert_beta: float = _f(0.1, "weight beta of the cross-entropy in the "
                          "expert term", "method")
  # Distillation (post-processing).
  steps: int = _f(1000, "optimisation steps on the synthetic pixels",
                  "method")
  lr_img: float = _f(0.05, "learning rate of the synthetic pixels (Adam)",
                     "method")
  extractor_width: int = _f(128, "width of the extractor ConvNets",
                            "method")
  depth: int = _f(0, "ConvNet depth (0: 3 for >= 16 px images, 2 for 8 px)",
                  "method")
  strategy: str = _f("color_crop_cutout_flip_scale_rotate",
                     "DSA augmentation strategy ('none' disables)",
                     "method")
  # Evaluation.
  no_eval: bool = _f(False, "skip evaluation (no metrics.json)", "evaluation")
  eval_models: int = _f(5, "number of evaluation models", "evaluation")
  eval_epochs: int = _f(300, "training epochs of each evaluation model",
                        "evaluation")
  eval_width: int = _f(128, "width of the evaluation ConvNets", "evaluation")
  references: bool = _f(False, "also evaluate the non-private references "
                        "(random real subset of IPC per class, full "
                        "training set)", "evaluation")
  # Parallelism and memory (performance only: the guarantee is the same).
  devices: int = _f(0, "devices of the data-parallel mesh for the private "
                    "passes (0: every device of every process)", "performance")
  microbatch: int = _f(0, "examples whose per-example embeddings or "
                       "gradients are held at once in the private passes "
                       "(0: automatic: query embeddings in chunks of 100 "
                       "on CPU and whole batches on accelerators; the "
                       "expert's per-example gradients in chunks of 128 "
                       "on CPU and 1024 on accelerators, so memory does "
                       "not grow with N); bounds memory, same result up "
                       "to float summation order", "performance")
  no_skip_padding: bool = _f(
      False, "the private passes skip their microbatches of padding only "
      "(the expert's steps on every device; the queries' where they run "
      "in chunks, as on CPU), so a step's time follows the realised "
      "Poisson batch size, a timing side channel outside the guarantee "
      "(README, \"Not protected\"); this flag computes them, so that the "
      "time follows the padded capacity (a public bound), at the cost of "
      "that compute; the same releases either way", "performance")
  coordinator_address: str = _f("", "multi-host: HOST:PORT of process 0 "
                                "(empty: JAX_COORDINATOR_ADDRESS, or a "
                                "single process)", "performance")
  num_processes: int = _f(0, "multi-host: number of processes (0: "
                          "JAX_NUM_PROCESSES or auto-detected)", "performance")
  process_id: int = _f(-1, "multi-host: this process's index (-1: "
                       "JAX_PROCESS_ID or auto-detected)", "performance")
  conv_impl: str = _f(
      "auto", "algorithm of the ConvNets' 3x3 convolutions: winograd "
      "(F(2x2,3x3) as batched matmuls), xla (XLA's convolution) or auto "
      "(winograd on CPU for layers with >= 64 input channels on maps of "
      ">= 64 pixels, xla otherwise and on GPU/TPU); same function up to "
      "float rounding", "performance",
      choices=CONV_IMPLS)
  no_retain_host_memory: bool = _f(
      False, "the dpgeng command keeps freed host memory mapped (glibc; "
      "dpgeng_jax.hostmem) so that XLA:CPU's per-call buffers are not "
      "page-faulted in again; this flag turns that off (the process then "
      "returns memory to the system after large steps)", "performance")
  no_compile_cache: bool = _f(
      False, "the dpgeng command keeps XLA's compiled programs in a "
      "persistent cache (DPGENG_CACHE_DIR, else $XDG_CACHE_HOME/dpgeng_jax/"
      "xla or ~/.cache/dpgeng_jax/xla) so that a second run skips "
      "compilation; no private array is a compile-time constant, so the "
      "cache holds none of the data; this flag turns it off",
      "performance")
  # Run.
  seed: int = _f(0, "seed of the PUBLIC randomness only (init, "
                 "augmentation, extractors); noise and sampling use OS "
                 "entropy", "method")
  deterministic: bool = _f(False, "TEST MODE: derive noise and sampling "
                           "from --seed; the run is then NOT private",
                           "privacy")
  overwrite: bool = _f(False, "replace a finished run in --out", "output")
  resume: str = _f("", "continue the unfinished run in DIR (its --out) "
                   "after its last finished stage, without running again "
                   "any private mechanism whose release is saved; options "
                   "not given are the saved run's, and options that change "
                   "the guarantee or a release must not differ", "output")
  checkpoint_every: int = _f(200, "save the distillation state every N "
                             "steps (a killed run resumes mid-way; 0: only "
                             "at the end)", "output")
  quiet: bool = _f(False, "no progress bars or config print", "output")
  tensorboard: str = _f("", "also write the run's scalars and figures as "
                        "TensorBoard events into DIR (tensorboardX)",
                        "output")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

def resume_free_fields() -> frozenset[str]:
  """Options that change neither the guarantee nor any release."""
  return frozenset(
      f.name for f in dataclasses.fields(Config)
      if f.metadata.get("group") in ("performance", "evaluation", "output")
      and f.name != "references")


def privacy_fields() -> list[str]:
  return [f.name for f in dataclasses.fields(Config)
          if f.metadata.get("group") == "privacy"]
