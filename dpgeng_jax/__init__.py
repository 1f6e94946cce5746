"""dpgeng_jax: differentially private dataset distillation in JAX/Flax.

Public API (pure functions over explicit pytrees, plus `run` for a whole
pipeline). See README.md and the module docstrings.
"""

from dpgeng_jax import accounting
from dpgeng_jax import augment
from dpgeng_jax.clipping import (ClippedClassSum, class_sums, clip_rows,
                                 clip_vector, clipped_class_sums,
                                 clipped_grad_sum, microbatched)
from dpgeng_jax.config import Config
from dpgeng_jax.data import Dataset, from_arrays, load_dataset
from dpgeng_jax.distill import (DistillState, QueryPlan,
                                feature_matching_loss, make_step,
                                synthetic_class_means)
from dpgeng_jax.errors import ConfigError, DataError, DpgengError
from dpgeng_jax import evaluate
from dpgeng_jax.evaluate import EvalConfig
from dpgeng_jax.mechanisms import (ClassMajorData, FlatData, QuerySpec,
                                   SamplingOverflowError, SumRelease,
                                   class_major, make_dp_sgd_step,
                                   noisy_class_sums, noisy_targets,
                                   poisson_capacity, poisson_sample)
from dpgeng_jax import counts
from dpgeng_jax.counts import ClassSizes, release_class_counts
from dpgeng_jax import noise
from dpgeng_jax.noise import (add_gaussian_noise, deterministic_secret_key,
                              gaussian_noise, secret_key,
                              tree_add_gaussian_noise)
from dpgeng_jax import hostmem
from dpgeng_jax.models import ConvNet
from dpgeng_jax import parallel
from dpgeng_jax import pergrad
from dpgeng_jax.pergrad import convnet_clipped_grad_sum
from dpgeng_jax.pipeline import RunResult, run, write_outputs
from dpgeng_jax import winograd

__version__ = "0.1.0"

__all__ = [
    "ClassMajorData", "ClassSizes", "ClippedClassSum", "Config", "FlatData",
    "ConfigError", "ConvNet", "add_gaussian_noise", "counts", "noise",
    "release_class_counts", "tree_add_gaussian_noise",
    "DataError", "Dataset", "DistillState", "DpgengError", "EvalConfig",
    "QueryPlan", "QuerySpec", "RunResult", "SamplingOverflowError",
    "SumRelease", "make_dp_sgd_step",
    "accounting", "augment", "class_major", "class_sums", "clip_rows",
    "clip_vector", "clipped_class_sums", "clipped_grad_sum",
    "convnet_clipped_grad_sum", "deterministic_secret_key",
    "evaluate", "feature_matching_loss", "from_arrays", "gaussian_noise",
    "hostmem",
    "load_dataset", "make_step", "microbatched", "noisy_class_sums",
    "noisy_targets", "parallel", "pergrad", "poisson_capacity",
    "poisson_sample", "run", "secret_key",
    "synthetic_class_means", "winograd", "write_outputs",
]
