"""model.remat's checks, shared by the models that take it."""

from __future__ import annotations

import jax
import numpy as np
from flax import linen as nn

from research.models import layers


def recomputed_matmuls(make_model, inputs) -> dict[str, int]:
  """For each of layers.REMAT_POLICIES: checks that `make_model(remat=policy)` has the
  same parameters and computes the same training loss and gradients (dropout included)
  as without remat; returns how many more matmuls its gradient's program holds as JAX
  lowers it (before XLA, which on the CPU merges the recomputation back)."""
  plain = make_model(remat="none")
  params = nn.meta.unbox(plain.init(jax.random.key(1), inputs))

  def loss(model):
    rngs = {"dropout": jax.random.key(3)}
    return lambda p: model.apply(p, inputs, train=True, rngs=rngs).mean()

  want_loss, want_grads = jax.value_and_grad(loss(plain))(params)
  dots = {}
  for policy in layers.REMAT_POLICIES:
    model = make_model(remat=policy)
    assert jax.tree.structure(nn.meta.unbox(model.init(jax.random.key(1), inputs))) == (
      jax.tree.structure(params)
    )
    got_loss, got_grads = jax.value_and_grad(loss(model))(params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    dots[policy] = jax.jit(jax.grad(loss(model))).lower(params).as_text().count("dot_general")
  return {policy: count - dots["none"] for policy, count in dots.items()}
