"""PyTorch MAML-RL surrogate losses, correct and with one planted bug each (docstring: which).

Contract (verify.rl_audit): ``fn(params, inner, outer, alpha, gamma) -> loss``
with ``params`` the softmax logits ``(S, A)`` and the batches as dicts of
tensors (states, actions, rewards, log_probs). Written the way DiCE / MAML-RL
code is written (magic box, ``torch.autograd.grad(..., create_graph=True)``);
nothing here uses metaverify.
"""

from __future__ import annotations

import torch


def magic_box(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x - x.detach())


def log_probs(params: torch.Tensor, batch: dict) -> torch.Tensor:
    lp = torch.log_softmax(params, dim=-1)
    return lp[batch["states"], batch["actions"]]  # (n, H)


def discounts(batch: dict, gamma: float) -> torch.Tensor:
    H = batch["rewards"].shape[-1]
    return gamma ** torch.arange(H, dtype=torch.float64)


def reward_to_go(batch: dict, gamma: float) -> torch.Tensor:
    """sum_{k>=t} gamma^k r_k (discounted from time 0)."""
    c = batch["rewards"] * discounts(batch, gamma)
    return torch.flip(torch.cumsum(torch.flip(c, [1]), 1), [1])


def inner_step(params, inner, alpha, gamma, returns=reward_to_go, lr_factor=1.0):
    lp = log_probs(params, inner)
    surrogate = (lp * returns(inner, gamma)).sum(1).mean()
    (g,) = torch.autograd.grad(surrogate, params, create_graph=True)
    return params + lr_factor * alpha * g, lp


def dice_outer(theta_p, outer, gamma, inner_lp_sum=None):
    lp = log_probs(theta_p, outer)
    deps = torch.cumsum(lp, 1)
    if inner_lp_sum is not None:
        deps = deps + inner_lp_sum
    costs = outer["rewards"] * discounts(outer, gamma)
    return (magic_box(deps) * costs).sum(1).mean()


def maml_rl_dice(params, inner, outer, alpha, gamma):
    """Correct: DiCE over the whole graph (outer costs carry the inner batch's magic box)."""
    theta_p, lp_in = inner_step(params, inner, alpha, gamma)
    return -dice_outer(theta_p, outer, gamma, inner_lp_sum=lp_in.sum())


def maml_rl_dice_loss_and_grads(params, inner, outer, alpha, gamma):
    """Correct, returning (loss, grads)."""
    loss = maml_rl_dice(params, inner, outer, alpha, gamma)
    (g,) = torch.autograd.grad(loss, params)
    return loss, g


def maml_rl_no_inner_score(params, inner, outer, alpha, gamma):
    """Bug: no inner score term (the original MAML-RL estimator): plain REINFORCE outer loss at theta'."""
    theta_p, _ = inner_step(params, inner, alpha, gamma)
    lp = log_probs(theta_p, outer)
    return -(lp * reward_to_go(outer, gamma)).sum(1).mean()


def maml_rl_emaml_mean(params, inner, outer, alpha, gamma):
    """Bug: E-MAML-style inner score term with the mean of the inner trajectories' log-likelihoods."""
    theta_p, lp_in = inner_step(params, inner, alpha, gamma)
    return -dice_outer(theta_p, outer, gamma, inner_lp_sum=lp_in.sum(1).mean())


def maml_rl_lr_twice_averaged(params, inner, outer, alpha, gamma):
    """Bug: wrong inner learning rate (the inner gradient divided by the batch size a second time)."""
    n = inner["rewards"].shape[0]
    theta_p, lp_in = inner_step(params, inner, alpha, gamma, lr_factor=1.0 / n)
    return -dice_outer(theta_p, outer, gamma, inner_lp_sum=lp_in.sum())


def _undiscounted_to_go(batch, gamma):
    r = batch["rewards"]
    out, run = [], torch.zeros(r.shape[0], dtype=r.dtype)
    for t in range(r.shape[1] - 1, -1, -1):
        run = r[:, t] + gamma * run
        out.append(run)
    return torch.stack(out[::-1], 1)


def maml_rl_undiscounted_inner(params, inner, outer, alpha, gamma):
    """Bug: the inner reward-to-go misses the gamma^t factor (the usual discount_cumsum)."""
    theta_p, lp_in = inner_step(params, inner, alpha, gamma, returns=_undiscounted_to_go)
    return -dice_outer(theta_p, outer, gamma, inner_lp_sum=lp_in.sum())


def maml_rl_reversed_box(params, inner, outer, alpha, gamma):
    """Bug: the outer DiCE magic box accumulates log-probs in the wrong direction (a_{>=t} instead of a_{<=t})."""
    theta_p, lp_in = inner_step(params, inner, alpha, gamma)
    lp = log_probs(theta_p, outer)
    deps = torch.flip(torch.cumsum(torch.flip(lp, [1]), 1), [1]) + lp_in.sum()
    costs = outer["rewards"] * discounts(outer, gamma)
    return -(magic_box(deps) * costs).sum(1).mean()


def maml_rl_batch_mean_baseline(params, inner, outer, alpha, gamma):
    """Bug: inner advantages = returns - returns.mean(0) (a baseline that includes the trajectory itself)."""
    def adv(batch, g):
        G = reward_to_go(batch, g)
        return G - G.mean(0, keepdim=True)

    theta_p, lp_in = inner_step(params, inner, alpha, gamma, returns=adv)
    return -dice_outer(theta_p, outer, gamma, inner_lp_sum=lp_in.sum())


def maml_rl_sign_flipped(params, inner, outer, alpha, gamma):
    """Bug: returns the objective (to maximise) instead of a loss."""
    return -maml_rl_dice(params, inner, outer, alpha, gamma)


def maml_rl_lvc(params, inner, outer, alpha, gamma):
    """ProMP's LVC inner surrogate (biased by design), REINFORCE outer loss."""
    lp = log_probs(params, inner)
    surrogate = (torch.exp(lp - lp.detach()) * reward_to_go(inner, gamma)).sum(1).mean()
    (g,) = torch.autograd.grad(surrogate, params, create_graph=True)
    theta_p = params + alpha * g
    lp_out = log_probs(theta_p, outer)
    return -(lp_out * reward_to_go(outer, gamma)).sum(1).mean()


def maml_rl_squared_rewards(params, inner, outer, alpha, gamma):
    """Bug outside the catalogue: the outer costs use squared rewards."""
    theta_p, lp_in = inner_step(params, inner, alpha, gamma)
    lp = log_probs(theta_p, outer)
    costs = outer["rewards"] ** 2 * discounts(outer, gamma)
    return -(magic_box(torch.cumsum(lp, 1) + lp_in.sum()) * costs).sum(1).mean()


#: name -> (function, expected verdict: None for pass, else the catalogue key the audit must name, or "unexplained")
CORPUS = {
    "dice": (maml_rl_dice, None),
    "dice-loss-and-grads": (maml_rl_dice_loss_and_grads, None),
    "no-inner-score": (maml_rl_no_inner_score, "maml-original"),
    "emaml-mean": (maml_rl_emaml_mean, "e-maml"),
    "lr-twice-averaged": (maml_rl_lr_twice_averaged, "dice+lr*0.5"),
    "undiscounted-inner": (maml_rl_undiscounted_inner, "dice+inner:undiscounted"),
    "reversed-box": (maml_rl_reversed_box, "dice+outer:past"),
    "batch-mean-baseline": (maml_rl_batch_mean_baseline, "dice+batch-mean-baseline"),
    "sign-flipped": (maml_rl_sign_flipped, "dice+sign"),
    "lvc": (maml_rl_lvc, "lvc"),
    "squared-rewards": (maml_rl_squared_rewards, "unexplained"),
}
