"""Meta-reinforcement learning on enumerable MDPs: exact ``V``, ``J = E_D[V(theta')]``, ``grad J`` and estimators.

Conventions (CONVENTIONS.md, "Meta-reinforcement learning"): tabular softmax
policies ``theta (S, A)``, finite-horizon discounted value, REINFORCE inner step
with the causal reward-to-go discounted from time 0 and no baseline by default
(:mod:`reference.rl.maml_rl`). Modules: :mod:`~reference.rl.mdp` (MDPs,
``V`` and its derivatives), :mod:`~reference.rl.trajectories` (enumeration,
sampling), :mod:`~reference.rl.maml_rl` (``J`` and ``grad J``),
:mod:`~reference.rl.estimators` (DiCE, MAML-RL, E-MAML, LVC, ... with exact
expectations, biases and a Monte-Carlo z-test).
"""

from reference.rl.estimators import (
    ESTIMATORS,
    EstimatorSpec,
    ZTest,
    estimate,
    exact_bias,
    exact_expectation,
    expectation_by_pairs,
    get_estimator,
    iterate_pairs,
    monte_carlo,
    sample_pairs,
    z_test,
)
from reference.rl.maml_rl import (
    batch_count,
    meta_objective,
    meta_objective_and_gradient,
    reinforce,
    reinforce_jacobian,
    trajectory_terms,
)
from reference.rl.mdp import (
    FiniteMDP,
    chain_mdp,
    grid_mdp,
    log_policy,
    policy,
    random_mdp,
    two_armed_bandit,
    value,
    value_and_gradient,
    value_gradient_hessian,
    value_infinite_horizon,
)
from reference.rl.trajectories import (
    RETURN_KINDS,
    Trajectories,
    batch_indices,
    count_trajectories,
    enumerate_trajectories,
    log_prob,
    returns_to_go,
    sample_trajectories,
    scores,
    step_log_probs,
)

__all__ = [
    "ESTIMATORS", "EstimatorSpec", "FiniteMDP", "RETURN_KINDS", "Trajectories", "ZTest",
    "batch_count", "batch_indices", "chain_mdp", "count_trajectories", "enumerate_trajectories", "estimate",
    "exact_bias", "exact_expectation", "expectation_by_pairs", "get_estimator", "grid_mdp", "iterate_pairs",
    "log_policy", "log_prob", "meta_objective", "meta_objective_and_gradient", "monte_carlo", "policy",
    "random_mdp", "reinforce", "reinforce_jacobian", "returns_to_go", "sample_pairs", "sample_trajectories",
    "scores", "step_log_probs", "trajectory_terms", "two_armed_bandit", "value", "value_and_gradient", "value_gradient_hessian",
    "value_infinite_horizon", "z_test",
]
