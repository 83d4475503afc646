"""PPO's controllers: small objects that carry a value from one iteration to the next and are
checkpointed with the trainer (state_dict / load_state_dict, JSON): the KL coefficient (fixed or
adaptive, Ziegler et al. 2019), the reference-likelihood constraint's multiplier
(`ppo.ref_nll_limit`) and the running moments of the score (`ppo.score_norm running`). Pure Python
and torch, no distributed calls: the stage hands them globally reduced numbers. The per-token math
they feed lives in `pipeline/ppo_math.py`.
"""

from __future__ import annotations

import math

from torch import Tensor


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", sec. 2.2): e = clip(KL / target - 1, -0.2, 0.2);
    beta <- beta * (1 + e * min(n_steps / horizon, 1)).
    The step share is capped at 1 so that one update moves beta by at most 20% (a rollout larger
    than the horizon would otherwise drive beta to 0 or double it at once).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * min(n_steps / self.horizon, 1.0)

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.value, self.target, self.horizon = (
            float(d["value"]),
            float(d["target"]),
            float(d["horizon"]),
        )


class RefNLLConstraint:
    """Keeps the rollout's mean per-token negative log-likelihood under the reference,
    E[-log ref(y_t)] (= the policy's entropy + its KL to the reference), at most `limit` x its
    value at the first iteration (the reference's own, when the policy starts as the reference).

    A policy that sharpens within what the reference finds likely lowers its entropy as its KL
    rises, and this stays flat; one that leaves it for outputs the reward model never saw (its
    blind spot) raises both. The constraint acts through a multiplier lambda >= 0 on log
    ref(y_t) in every token's reward, moved by dual ascent after each iteration: lambda <-
    max(0, lambda + lr x (nll / (limit x first) - 1)) (a Lagrangian relaxation, as in
    constrained RLHF: Moskovitz et al. 2023). Lambda stays 0 while the limit holds, so a run
    that never reaches it is unchanged.
    """

    def __init__(self, limit: float, lr: float) -> None:
        self.limit, self.lr = float(limit), float(lr)
        self.value, self.first = 0.0, None

    def update(self, nll: float) -> None:
        if self.first is None:
            self.first = float(nll)
            return
        excess = float(nll) / (self.limit * max(self.first, 1e-8)) - 1.0
        self.value = max(0.0, self.value + self.lr * excess)

    def ratio(self, nll: float) -> float:
        """nll / its first-iteration value (1.0 before the first update)."""
        return 1.0 if self.first is None else float(nll) / max(self.first, 1e-8)

    def state_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "first": self.first}

    def load_state_dict(self, d: dict) -> None:
        self.value, self.first = float(d["value"]), d["first"]


class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface; update() does nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.value = float(d["value"])


class RunningMoments:
    """Running mean / std of all scalars seen so far (e.g. for reward normalisation).

    Batches are merged with the parallel variance formula of Chan, Golub & LeVeque (1979). Before
    any update mean = 0, std = 1, count = 0. `std` is the unbiased (n - 1) standard deviation.
    """

    def __init__(self) -> None:
        self.mean, self.std, self.count = 0.0, 1.0, 0
        self._m2 = 0.0  # sum of squared deviations from the mean

    def update(self, x: Tensor) -> tuple[float, float]:
        """Merge the values of x (any shape, non-empty); returns (batch mean, unbiased batch
        std)."""
        xs = x.detach().double().flatten()
        n = xs.numel()
        if n == 0:
            raise ValueError("RunningMoments.update: empty tensor")
        b_mean = xs.mean().item()
        b_m2 = ((xs - b_mean) ** 2).sum().item()
        tot = self.count + n
        delta = b_mean - self.mean
        self._m2 += b_m2 + delta**2 * self.count * n / tot
        self.mean += delta * n / tot
        self.count = tot
        self.std = math.sqrt(self._m2 / (tot - 1)) if tot > 1 else 0.0
        return b_mean, (math.sqrt(b_m2 / (n - 1)) if n > 1 else 0.0)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "count": self.count, "m2": self._m2}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.mean, self.std = float(d["mean"]), float(d["std"])
        self.count, self._m2 = int(d["count"]), float(d["m2"])
