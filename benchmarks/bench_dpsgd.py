"""DP-SGD step throughput on the standard ConvNet, JAX vs jax-privacy vs PyTorch.

    python benchmarks/bench_dpsgd.py --out runs/bench/dpsgd.json               # ~5 min
    python benchmarks/bench_dpsgd.py --quick --out runs/bench/dpsgd_quick.json  # ~60 s

(times measured on the 2-core VM with other jobs running, load ~5; most of
--quick is XLA compiling the four per-example-gradient steps, ~8 s each.)

One DP-SGD step (per-example gradients, clip to C = 1, sum, add N(0, (sigma
C)^2) with sigma = 1, divide by the batch size 128, SGD lr 0.1) on a fixed
batch of 128 random 32x32x3 images, ConvNet width 128 depth 3 (instance norm),
10 classes, cross-entropy. Rows, timed side by side in one process
(interleaved rounds after warm-up, median over rounds):

  jax_nonprivate      jitted plain gradient step (mean loss), optax.sgd, on
                      dpgeng_jax's ConvNet (conv_impl='auto': on CPU its
                      wide layers are Winograd F(2x2, 3x3) batched matmuls,
                      dpgeng_jax/winograd.py)
  jax_nonprivate_xlaconv  the same with XLA's convolution (conv_impl='xla',
                      what flax.linen.Conv runs)
  ours_vmap           dpgeng_jax.mechanisms.make_dp_sgd_step (vmap of
                      jax.grad over examples), jitted
  ours_fast           dpgeng_jax.pergrad.convnet_clipped_grad_sum inside a
                      jitted step (skipped with a note if it does not import)
  ours_fast_xlaconv   ours_fast with XLA's convolution
  jaxprivacy_mb*      jax_privacy.clipping.clipped_grad, microbatch_size None
                      and 32 (a lax.fori_loop over microbatches), same noise
                      and update code as ours, on the ConvNet with XLA's
                      convolution (as a jax-privacy user writes it with
                      flax.linen.Conv)
  jaxprivacy_mbNone_winograd  the same on dpgeng_jax's ConvNet
  opacus_hooks        Opacus 1.x make_private (hooks), no Poisson sampling
  opacus_ghost        Opacus grad_sample_mode="ghost" (for Conv2d/GroupNorm it
                      falls back to per-sample gradients; only Linear and
                      Embedding have ghost norm samplers in opacus 1.6)
  torch_func          torch.func vmap(grad) per-sample gradients, clip, sum,
                      noise, SGD update
  torch_nonprivate    plain torch step

Torch rows run once per --torch-threads count (torch.set_num_threads before
each call). Also times an n x n float32 matmul (jnp.dot, torch.mm) in the
same rounds; achieved GFLOP/s counts 3 x the analytic forward FLOPs per
example (forward + backward), whatever the implementation really does.
Rows whose warm call is > --max-slowdown x the median of the others are not
put through the rounds (their warm-up figure is reported, flagged).

With --quick (batch 16, width 32, 2 rounds) the script also checks that the
clipped gradient sums of ours, jax-privacy, ours_fast (if present) and
torch.func (Flax parameters copied in) agree on the same inputs, and that
the opacus steps update every parameter.
Output: a markdown table on stdout; all figures in --out (JSON).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench  # noqa: E402  pylint: disable=wrong-import-position

FULL = dict(batch=128, width=128, depth=3, image_size=32, rounds=5, warmup=1,
            jp_microbatch="32", matmul_n=2048)
QUICK = dict(batch=16, width=32, depth=3, image_size=32, rounds=2, warmup=1,
             jp_microbatch="8", matmul_n=1024)


def main(argv=None):
  ap = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  _bench.add_shape_args(ap, "runs/bench/dpsgd.json",
                        quick_width=QUICK["width"])
  ap.add_argument("--batch", type=int, default=None,
                  help="examples per step (default 128; --quick 16)")
  ap.add_argument("--noise-multiplier", type=float, default=1.0,
                  help="sigma (default %(default)s)")
  ap.add_argument("--lr", type=float, default=0.1,
                  help="SGD learning rate (default %(default)s)")
  ap.add_argument("--jp-microbatch", default=None,
                  help="jax-privacy microbatch sizes besides None (default "
                       "'32'; --quick '8'; '' for none)")
  ap.add_argument("--no-opacus", action="store_true",
                  help="skip the opacus rows")
  _bench.add_common_args(ap)
  args = ap.parse_args(argv)
  _bench.resolve(args, FULL, QUICK)

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import mechanisms  # pylint: disable=import-outside-toplevel
  from dpgeng_jax import models  # pylint: disable=import-outside-toplevel

  env = _bench.environment()
  threads = _bench.torch_thread_rows(args.torch_threads)
  torch = None if args.no_torch else _bench.maybe_torch()

  b, k, c_clip, sigma, lr = (args.batch, args.num_classes, args.clip_norm,
                             args.noise_multiplier, args.lr)
  hw = (args.image_size, args.image_size)
  stddev = sigma * c_clip
  model = models.ConvNet(num_classes=k, width=args.width, depth=args.depth)
  # The same parameters run by XLA's convolution (flax.linen.Conv's).
  model_xla = models.ConvNet(num_classes=k, width=args.width,
                             depth=args.depth, conv_impl="xla")
  kp, kx, ky, kn = jax.random.split(jax.random.key(args.seed), 4)
  params = models.init_params(model, kp, (*hw, 3))
  x = jax.random.normal(kx, (b, *hw, 3), jnp.float32)
  y = jax.random.randint(ky, (b,), 0, k, jnp.int32)
  mask = jnp.ones((b,), jnp.float32)
  n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  flops = 3 * b * _bench.convnet_forward_flops(hw, 3, args.width, args.depth,
                                               k)
  opt = optax.sgd(lr)
  opt_state = opt.init(params)
  notes = []
  private = {}  # name -> Impl of a JAX DP-SGD step (for the checks)

  print(f"dp-sgd: batch {b}, {hw[0]}x{hw[1]}x3, width {args.width}, depth "
        f"{args.depth}, {n_params} parameters, C={c_clip}, sigma={sigma}; "
        f"{flops / 1e9:.2f} GFLOP per step (3 x forward)")
  print(f"jax {env['jax']} ({env['jax_device_kind']}), torch {env['torch']} "
        f"threads {threads} (default {env.get('torch_default_num_threads')}), "
        f"opacus {env['opacus']}, jax_privacy {env['jax_privacy']}, loadavg "
        f"{env['loadavg_start']}")

  impls = []

  def add_jax(name, fn, fargs, note=""):
    print(f"compiling {name} ...", flush=True)
    im = _bench.jax_impl(name, fn, fargs, items=b, flops=flops, note=note)
    impls.append(im)
    print(f"  first call {im.first_call_s:.2f} s (compile {im.compile_s:.2f})")
    return im

  def loss_fn(p, batch):
    xx, yy = batch
    return models.cross_entropy(model, p, xx, yy)

  def nonprivate_step_fn(net):
    def nonprivate_step(p, s, xx, yy):
      g = jax.grad(lambda pp: models.cross_entropy(net, pp, xx, yy))(p)
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s
    return nonprivate_step
  add_jax("jax_nonprivate", nonprivate_step_fn(model),
          (params, opt_state, x, y))
  add_jax("jax_nonprivate_xlaconv", nonprivate_step_fn(model_xla),
          (params, opt_state, x, y))

  ours_step = mechanisms.make_dp_sgd_step(
      loss_fn, opt, clip_norm=c_clip, noise_multiplier=sigma,
      expected_batch_size=b)
  private["ours_vmap"] = add_jax("ours_vmap", ours_step,
                                 (params, opt_state, (x, y), mask, kn))

  def make_step(grad_sum):
    """A DP-SGD step around any clipped-gradient-sum function: the same
    noise and update code for every JAX row that is not ours_vmap."""
    def step(p, s, xx, yy, mm, key):
      g = mechanisms.tree_add_gaussian_noise(key, grad_sum(p, xx, yy, mm),
                                             stddev)
      g = jax.tree.map(lambda a: a / b, g)
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s
    return step

  # ours_fast: the ConvNet-specific per-example-gradient path.
  try:
    from dpgeng_jax import pergrad  # pylint: disable=import-outside-toplevel
    fast_sum = lambda p, xx, yy, mm: pergrad.convnet_clipped_grad_sum(
        model, p, xx, yy, mm, clip_norm=c_clip)
    jax.eval_shape(fast_sum, params, x, y, mask)
  except Exception as e:  # pylint: disable=broad-except
    notes.append(f"ours_fast skipped: dpgeng_jax.pergrad."
                 f"convnet_clipped_grad_sum unavailable ({type(e).__name__}: "
                 f"{e})")
    print("NOTE:", notes[-1])
  else:
    private["ours_fast"] = add_jax("ours_fast", make_step(fast_sum),
                                   (params, opt_state, x, y, mask, kn))
    fast_xla = lambda p, xx, yy, mm: pergrad.convnet_clipped_grad_sum(
        model_xla, p, xx, yy, mm, clip_norm=c_clip)
    private["ours_fast_xlaconv"] = add_jax(
        "ours_fast_xlaconv", make_step(fast_xla),
        (params, opt_state, x, y, mask, kn))

  # jax-privacy.
  try:
    from jax_privacy import clipping as jp_clipping  # pylint: disable=import-outside-toplevel
  except Exception as e:  # pylint: disable=broad-except
    jp_clipping = None
    notes.append(f"jax_privacy rows skipped: {e}")
    print("NOTE:", notes[-1])
  if jp_clipping is not None:
    def jp_step(net, mb):
      cg = jp_clipping.clipped_grad(
          lambda p, xx, yy: models.cross_entropy(net, p, xx, yy),
          argnums=0, l2_clip_norm=c_clip, batch_argnums=(1, 2),
          microbatch_size=mb)
      return make_step(lambda p, xx, yy, mm: cg(p, xx, yy,
                                                is_padding_example=mm == 0))

    for mb in [None] + _bench.parse_ints(args.jp_microbatch):
      if mb is not None and b % mb:
        notes.append(f"jaxprivacy_mb{mb} skipped: {mb} does not divide {b}")
        print("NOTE:", notes[-1])
        continue
      name = f"jaxprivacy_mb{mb if mb else 'None'}"
      private[name] = add_jax(name, jp_step(model_xla, mb),
                              (params, opt_state, x, y, mask, kn),
                              note="XLA convolution")
    private["jaxprivacy_mbNone_winograd"] = add_jax(
        "jaxprivacy_mbNone_winograd", jp_step(model, None),
        (params, opt_state, x, y, mask, kn),
        note="dpgeng_jax's ConvNet (conv_impl auto)")

  # PyTorch and Opacus.
  torch_checks = {}
  if torch is not None:
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
    from torch.func import functional_call, grad, vmap  # pylint: disable=import-outside-toplevel
    xt = torch.from_numpy(np.array(x).transpose(0, 3, 1, 2)).contiguous()
    yt = torch.from_numpy(np.array(y)).long()
    fhw = _bench.feat_hw(hw, args.depth)

    def new_net():
      net = _bench.torch_convnet(3, args.width, args.depth, k, hw)
      _bench.load_flax_params_into_torch(net, params, args.depth, fhw)
      return net

    def add_torch(name, call, note=""):
      for t in threads:
        print(f"torch row {name}{_bench.thread_suffix(t)} ...", flush=True)
        impls.append(_bench.torch_impl(name + _bench.thread_suffix(t), call,
                                       items=b, flops=flops, threads=t,
                                       note=note))

    net_np = new_net()
    opt_np = torch.optim.SGD(net_np.parameters(), lr=lr)

    def torch_nonprivate():
      opt_np.zero_grad(set_to_none=True)
      F.cross_entropy(net_np(xt), yt).backward()
      opt_np.step()

    net_f = new_net()
    tparams = {n_: v.detach().clone() for n_, v in net_f.named_parameters()}

    def loss_one(p, xi, yi):
      out = functional_call(net_f, p, (xi.unsqueeze(0),))
      return F.cross_entropy(out, yi.unsqueeze(0))
    per_sample_grads = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def torch_clipped_sum(p):
      g = per_sample_grads(p, xt, yt)
      sq = sum(v.reshape(b, -1).pow(2).sum(1) for v in g.values())
      norms = sq.sqrt()
      scale = torch.where(norms > c_clip, c_clip / norms.clamp_min(1e-30),
                          torch.ones_like(norms))
      return {n_: torch.tensordot(scale, v, dims=1) for n_, v in g.items()}

    def torch_func_step():
      with torch.no_grad():
        sums = torch_clipped_sum(tparams)
        for n_, s in sums.items():
          s.add_(stddev * torch.randn_like(s))
          tparams[n_].sub_(lr / b * s)

    torch_checks["torch_func_sum"] = lambda: torch_clipped_sum(
        {n_: v.detach().clone() for n_, v in new_net().named_parameters()})

    opacus_rows = []
    if not args.no_opacus:
      try:
        import opacus  # pylint: disable=import-outside-toplevel
      except Exception as e:  # pylint: disable=broad-except
        notes.append(f"opacus rows skipped: {e}")
        print("NOTE:", notes[-1])
      else:
        warnings.filterwarnings("ignore", module="opacus")
        # Opacus's hooks on the first layer, whose input needs no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook")
        data = torch.utils.data.TensorDataset(xt, yt)
        for mode in ("hooks", "ghost"):
          try:
            net_o = new_net()
            opt_o = torch.optim.SGD(net_o.parameters(), lr=lr)
            loader = torch.utils.data.DataLoader(data, batch_size=b)
            engine = opacus.PrivacyEngine()
            kw = dict(module=net_o, optimizer=opt_o, data_loader=loader,
                      noise_multiplier=sigma, max_grad_norm=c_clip,
                      poisson_sampling=False, grad_sample_mode=mode)
            if mode == "ghost":
              model_o, dp_opt, crit, _ = engine.make_private(
                  criterion=torch.nn.CrossEntropyLoss(), **kw)
            else:
              model_o, dp_opt, _ = engine.make_private(**kw)
              crit = torch.nn.CrossEntropyLoss()

            def opacus_step(model_o=model_o, dp_opt=dp_opt, crit=crit):
              dp_opt.zero_grad(set_to_none=True)
              loss = crit(model_o(xt), yt)
              loss.backward()
              dp_opt.step()
            opacus_step()  # fails here, not in the timing loop
            opacus_rows.append((f"opacus_{mode}", opacus_step,
                                f"expected batch {dp_opt.expected_batch_size}"
                                ))
            torch_checks[f"opacus_{mode}_net"] = (net_o, opacus_step)
          except Exception as e:  # pylint: disable=broad-except
            notes.append(f"opacus_{mode} skipped: {type(e).__name__}: {e}")
            print("NOTE:", notes[-1])

    add_torch("torch_nonprivate", torch_nonprivate)
    add_torch("torch_func", torch_func_step)
    for name, call, note in opacus_rows:
      add_torch(name, call, note)
  else:
    notes.append("torch rows skipped: torch not importable or --no-torch")

  impls += _bench.matmul_impls(args.matmul_n, with_torch=torch is not None,
                               torch_threads=threads)

  checks = {"n_params": n_params}
  if args.quick:
    # Every JAX step uses the same noise key and the same noise function, so
    # the updated parameters must agree; ours_vmap also returns its noisy
    # mean gradient, from which the clipped sum is recovered for torch.
    print("checks (same inputs; JAX rows share the noise key):")
    im = private["ours_vmap"]
    ref_params, _, noisy_mean = im.fn(*im.args)
    for name, im in private.items():
      if name == "ours_vmap":
        continue
      got = im.fn(*im.args)[0]
      diff = _bench.max_abs_diff_trees(got, ref_params)
      checks[f"max_abs_diff_params_after_step_{name}_vs_ours"] = diff
      print(f"  {name} vs ours_vmap: params after one step, max abs diff "
            f"{diff:.3g}")
      assert diff < 1e-5, (name, diff)
    noise = mechanisms.tree_add_gaussian_noise(
        kn, jax.tree.map(jnp.zeros_like, noisy_mean), stddev)
    ref = jax.tree.map(lambda g, z: g * b - z, noisy_mean, noise)
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(ref))
    if "torch_func_sum" in torch_checks:
      got = _bench.torch_grads_to_flax(torch_checks["torch_func_sum"](),
                                       args.depth, fhw)
      diff = _bench.max_abs_diff_trees(got, ref)
      checks["max_abs_diff_torch_func_vs_ours"] = diff
      print(f"  torch_func vs ours_vmap: clipped gradient sum, max abs diff "
            f"{diff:.3g} (max |sum| {scale:.3g}; Flax params copied in)")
      assert diff < 1e-4 * max(1.0, scale), diff
    for key_, val in torch_checks.items():
      if key_.endswith("_net"):
        net_o, step_o = val
        before = [p.detach().clone() for p in net_o.parameters()]
        step_o()
        moved = sum(int(not torch.equal(p0, p1)) for p0, p1 in
                    zip(before, net_o.parameters()))
        count = sum(p.numel() for p in net_o.parameters())
        checks[f"{key_[:-4]}_params_updated"] = f"{moved}/{len(before)}"
        checks[f"{key_[:-4]}_n_params"] = count
        print(f"  {key_[:-4]}: {moved}/{len(before)} tensors updated by one "
              f"step, {count} parameters (JAX {n_params})")
        assert moved == len(before) and count == n_params

  _bench.time_and_report(args, impls, notes, baseline="ours_vmap",
                         items_label="examples", record={
      "benchmark": "dpsgd", "environment": env,
      "examples_per_call": b, "n_params": n_params,
      "flops_per_call_fwd_bwd": flops, "checks": checks})


if __name__ == "__main__":
  main()
