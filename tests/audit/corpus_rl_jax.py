"""JAX MAML-RL surrogate losses, correct and with one planted bug each (mirrors corpus_rl_torch.py).

Contract (verify.rl_audit): ``fn(params, inner, outer, alpha, gamma) -> loss``;
magic box with ``jax.lax.stop_gradient``, the inner step with ``jax.grad``.
Nothing here uses metaverify.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def magic_box(x):
    return jnp.exp(x - jax.lax.stop_gradient(x))


def log_probs(params, batch):
    lp = jax.nn.log_softmax(params, axis=-1)
    return lp[batch["states"], batch["actions"]]  # (n, H)


def discounts(batch, gamma):
    return gamma ** jnp.arange(batch["rewards"].shape[-1])


def reward_to_go(batch, gamma):
    c = batch["rewards"] * discounts(batch, gamma)
    return jnp.flip(jnp.cumsum(jnp.flip(c, 1), 1), 1)


def inner_step(params, inner, alpha, gamma, returns=reward_to_go, lr_factor=1.0):
    def surrogate(p):
        return (log_probs(p, inner) * returns(inner, gamma)).sum(1).mean()

    return params + lr_factor * alpha * jax.grad(surrogate)(params), log_probs(params, inner)


def dice_outer(theta_p, outer, gamma, inner_lp_sum=None):
    deps = jnp.cumsum(log_probs(theta_p, outer), 1)
    if inner_lp_sum is not None:
        deps = deps + inner_lp_sum
    return (magic_box(deps) * outer["rewards"] * discounts(outer, gamma)).sum(1).mean()


def maml_rl_dice(params, inner, outer, alpha, gamma):
    """Correct: DiCE over the whole graph (outer costs carry the inner batch's magic box)."""
    theta_p, lp_in = inner_step(params, inner, alpha, gamma)
    return -dice_outer(theta_p, outer, gamma, inner_lp_sum=lp_in.sum())


def maml_rl_dice_loss_and_grads(params, inner, outer, alpha, gamma):
    """Correct, returning (loss, grads)."""
    return jax.value_and_grad(maml_rl_dice)(params, inner, outer, alpha, gamma)


def maml_rl_no_inner_score(params, inner, outer, alpha, gamma):
    """Bug: no inner score term (the original MAML-RL estimator): plain REINFORCE outer loss at theta'."""
    theta_p, _ = inner_step(params, inner, alpha, gamma)
    return -(log_probs(theta_p, outer) * reward_to_go(outer, gamma)).sum(1).mean()


def maml_rl_emaml_mean(params, inner, outer, alpha, gamma):
    """Bug: E-MAML-style inner score term with the mean of the inner trajectories' log-likelihoods."""
    theta_p, lp_in = inner_step(params, inner, alpha, gamma)
    return -dice_outer(theta_p, outer, gamma, inner_lp_sum=lp_in.sum(1).mean())


def maml_rl_eager_only(params, inner, outer, alpha, gamma):
    """Correct, but with Python control flow on values (not traceable): the harness must fall back to eager."""
    if float(outer["rewards"].sum()) == 1234.5:  # never true; float() of a tracer fails under jit/vmap
        return jnp.zeros(())
    return maml_rl_dice(params, inner, outer, alpha, gamma)


CORPUS = {
    "dice": (maml_rl_dice, None),
    "dice-loss-and-grads": (maml_rl_dice_loss_and_grads, None),
    "no-inner-score": (maml_rl_no_inner_score, "maml-original"),
    "emaml-mean": (maml_rl_emaml_mean, "e-maml"),
}
