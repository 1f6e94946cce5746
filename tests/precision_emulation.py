"""Evaluate a JAX function as an accelerator at default precision would.

On recent GPUs a float32 contraction at Precision.DEFAULT rounds its inputs
to TF32 (10-bit mantissa), on TPUs to bfloat16 (7-bit mantissa); XLA:CPU
computes it in full float32. `emulate_default_precision(fn)(*args)` traces
fn to a jaxpr and evaluates it equation by equation, rounding the float32
inputs of every dot_general / conv_general_dilated whose precision is not
HIGHEST to bfloat16 first (the TPU case, the coarser one), and leaving the
rest unchanged. Nested jit, scan, cond (the branch taken) and
custom_jvp/custom_vjp calls are interpreted recursively, so a
default-precision sum anywhere inside the function is found.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core

_CONTRACTIONS = ("dot_general", "conv_general_dilated")


def _is_highest(precision) -> bool:
  if precision is None:
    return False
  if isinstance(precision, (tuple, list)):
    return all(p == lax.Precision.HIGHEST for p in precision)
  return precision == lax.Precision.HIGHEST


def _round(x):
  x = jnp.asarray(x)
  if x.dtype == jnp.float32:
    return x.astype(jnp.bfloat16).astype(jnp.float32)
  return x


def _closed(params, *names):
  for n in names:
    if n in params:
      v = params[n]
      return (v.jaxpr, v.consts) if hasattr(v, "consts") else (v, ())
  return None


def _eval(jaxpr, consts, *args):
  env = {}

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    outs = _apply(eqn, [read(v) for v in eqn.invars])
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def _apply(eqn, invals):
  name, params = eqn.primitive.name, eqn.params
  if name in _CONTRACTIONS:
    if not _is_highest(params.get("precision")):
      invals = [_round(x) for x in invals]
    return eqn.primitive.bind(*invals, **params)
  if name == "scan":
    return _scan(params, invals)
  sub = _closed(params, "jaxpr", "call_jaxpr", "fun_jaxpr")
  if sub is not None and name in ("jit", "pjit", "closed_call",
                                  "custom_jvp_call", "custom_vjp_call",
                                  "custom_vjp_call_jaxpr", "remat",
                                  "checkpoint"):
    outs = _eval(sub[0], sub[1], *invals[:len(sub[0].invars)])
    return outs if eqn.primitive.multiple_results else outs[0]
  if name == "cond":  # the branch the (concrete) index picks
    branch = params["branches"][int(invals[0])]
    return _eval(branch.jaxpr, branch.consts, *invals[1:])
  if name == "while":
    raise NotImplementedError(f"{name} is not interpreted")
  return eqn.primitive.bind(*invals, **params)


def _scan(params, invals):
  jaxpr, n_consts, n_carry = params["jaxpr"], params["num_consts"], (
      params["num_carry"])
  consts = invals[:n_consts]
  carry = list(invals[n_consts:n_consts + n_carry])
  xs = invals[n_consts + n_carry:]
  steps = range(params["length"])
  if params["reverse"]:
    steps = reversed(steps)
  ys = []
  for i in steps:
    out = _eval(jaxpr.jaxpr, jaxpr.consts, *consts, *carry,
                *[x[i] for x in xs])
    carry, y = out[:n_carry], out[n_carry:]
    ys.append(y)
  if params["reverse"]:
    ys = ys[::-1]
  stacked = [jnp.stack([y[j] for y in ys]) for j in range(len(ys[0]))] if (
      ys and ys[0]) else []
  return [*carry, *stacked]


def emulate_default_precision(fn):
  """fn evaluated with default-precision contractions at bfloat16 inputs."""

  def run(*args):
    closed = jax.make_jaxpr(fn)(*args)
    flat = jax.tree.leaves(args)
    out = _eval(closed.jaxpr, closed.consts, *flat)
    return jax.tree.unflatten(jax.tree.structure(jax.eval_shape(fn, *args)),
                              [np.asarray(o) for o in out])

  return run
