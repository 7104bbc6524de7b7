"""UniPCMultistepScheduler (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), data prediction
(diffusers' ``predict_x0=True``) for an ε-model, B(h) variants bh1 and bh2.

Each ε call k does, in diffusers' ``step``: x̂0 from ε (``convert_model_output``); the corrector UniC rewrites the
sample that the previous predictor produced, from the sample the previous step started from (``last_sample``, our
``xp``), the earlier x̂0 and the new one; the predictor UniP steps the (corrected) sample to the next noise level.
Both updates are transcribed here from diffusers' ``multistep_uni_c_bh_update`` / ``multistep_uni_p_bh_update``
and run once, in float64, on basis vectors (``Lin``): the rows are whatever linear combinations the formulas form.
The Vandermonde solves (ρ) happen here, at plan time.

Where diffusers' arithmetic is not finite, the plan takes the limit or refuses:

* ``final_sigmas_type="zero"``: the last step goes to σ = 0 (α = 1, λ = ∞). At order 1 its result is x̂0;
  diffusers gets it with bh2 and NaN with bh1 (it multiplies B(h) = −h = −∞ by a residual of 0); we drop the
  zero residual, so both give x̂0. At order ≥ 2 (``lower_order_final=False``) the divided differences divide by
  r_k = 0 and diffusers returns inf/NaN or fails to solve: refused.
* A zero-length last step (Karras σ with ``final_sigmas_type="sigma_min"``: σ_next = σ_min = σ): the sample
  stays, as diffusers gives at order ≤ 2 (h·φ₁ = 0, B(h) = 0); at order 3 (``lower_order_final=False``) its ρ
  system is 0/0 and diffusers returns NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from ...checks import found, is_int
from ...errors import ConfigError
from ...schedule import DiffusionConfig
from ..plan import COL, MAX_HISTORY, NO_CLIP, Lin, StepPlan, check_steps, noise_ids_for, row
from ..timesteps import SPACINGS, karras, sigma_to_t, spaced_solver
from .base import SchedulerConfig, alpha_sigma, alphas_cumprod

SOLVER_TYPES = ("bh1", "bh2")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclass(frozen=True)
class UniPCConfig(SchedulerConfig):
    """diffusers' UniPCMultistepScheduler options and defaults (ε prediction, ``predict_x0=True``, no thresholding).

    ``disable_corrector``: step indices k whose predicted sample is not corrected (the correction happens at step
    k + 1, as in diffusers); a list or tuple, stored as a sorted tuple without repeats, given back as a list."""

    NAME: ClassVar[str] = "UniPCMultistepScheduler"
    ALIAS: ClassVar[str] = "unipc"
    CHOICES: ClassVar[dict] = {"solver_order": (1, 2, 3), "solver_type": SOLVER_TYPES, "timestep_spacing": SPACINGS,
                               "final_sigmas_type": FINAL_SIGMAS_TYPES}
    RANGES: ClassVar[dict] = {"steps_offset": (0, 1000)}

    solver_order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    use_karras_sigmas: bool = False
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        super().__post_init__()
        v = self.disable_corrector
        if not isinstance(v, (list, tuple)) or not all(is_int(i) and i >= 0 for i in v):
            raise ConfigError(f"{self.NAME}.disable_corrector must be a list of step indices (integers >= 0), "
                              f"found {found(v)}")
        object.__setattr__(self, "disable_corrector", tuple(sorted({int(i) for i in v})))

    def options(self) -> dict[str, Any]:
        d = super().options()
        d["disable_corrector"] = list(self.disable_corrector)
        return d

    def timesteps_and_sigmas(self, diffusion: DiffusionConfig,
                             steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps [K], σ [K + 1]) as diffusers' ``set_timesteps``: the ε-call order and the VE noise levels
        σ = √((1 − ᾱ)/ᾱ) the solver steps through, the last one the final σ (0 or σ_min)."""
        T = diffusion.num_timesteps
        K = check_steps(steps, T)
        abar = alphas_cumprod(diffusion)
        train = np.sqrt((1 - abar) / abar)  # ascending in t
        if self.use_karras_sigmas:  # the model is called at the rounded t, the solver uses the Karras σ
            sig = karras(train[0], train[-1], K)
            ts = np.ascontiguousarray(sigma_to_t(sig, np.log(train)).round(), dtype=np.int64)
        else:
            ts = spaced_solver(T, T, K, self.timestep_spacing, self.steps_offset)
            if len(ts) == 0 or ts.max() >= T or ts.min() < 0 or len(np.unique(ts)) != len(ts):
                raise ConfigError(f"{self.NAME}: {K} steps with {self.timestep_spacing} spacing and steps_offset "
                                  f"{self.steps_offset} give timesteps outside [0, {T - 1}] or repeated ones")
            sig = train[ts]
        last = 0.0 if self.final_sigmas_type == "zero" else (sig[-1] if self.use_karras_sigmas else train[0])
        return ts, np.concatenate([sig, [last]])

    def plan(self, diffusion: DiffusionConfig, steps: int | None = None) -> StepPlan:
        ts, sig = self.timesteps_and_sigmas(diffusion, steps)
        table = unipc_rows(sig, self.solver_order, self.solver_type, self.lower_order_final, self.disable_corrector,
                           where=self.NAME)
        used = [j for j in range(1, MAX_HISTORY + 1) if table[:, [COL[f"m{j}"], COL[f"xp_m{j}"]]].any()]
        return StepPlan(self.NAME, self.options(), ts, noise_ids_for(ts), table, history=max(used, default=0),
                        uses_xp=True)


# --- diffusers' updates, transcribed onto Lin ------------------------------------------------------------------


def _lambda(sigma: float) -> tuple[float, float, float]:
    """(α_t, σ_t, λ_t = log α_t − log σ_t) of the VE noise level σ (diffusers _sigma_to_alpha_sigma_t); λ(0) = ∞."""
    alpha_t, sigma_t = alpha_sigma(np.float64(sigma))
    with np.errstate(divide="ignore"):
        return alpha_t, sigma_t, np.log(alpha_t) - np.log(sigma_t)


def _rhs(h: float, order: int, bh: str) -> tuple[float, float, np.ndarray]:
    """(hφ₁ = e^{−h} − 1, B(h), b): the right-hand side of the ρ system, as diffusers builds it (predict_x0)."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    B_h = hh if bh == "bh1" else np.expm1(hh)
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    return h_phi_1, B_h, np.array(b)


def _vandermonde(rks: list[float], order: int) -> np.ndarray:
    r = np.array([*rks, 1.0])
    return np.stack([r ** (i - 1) for i in range(1, order + 1)])


def uni_p(x: Lin, outputs: Sequence[Lin], sig: np.ndarray, k: int, order: int, bh: str) -> Lin:
    """diffusers' multistep_uni_p_bh_update at step k: ``outputs[i]`` is x̂0 of step k − i (its
    model_outputs[-(i+1)] after the shift)."""
    alpha_t, sigma_t, lambda_t = _lambda(sig[k + 1])
    alpha_s0, sigma_s0, lambda_s0 = _lambda(sig[k])
    h = lambda_t - lambda_s0
    if h == 0:  # a zero-length step: x_t_ = x, B(h) = 0
        return x
    m0 = outputs[0]
    rks, D1s = [], []
    for i in range(1, order):
        rk = (_lambda(sig[k - i])[2] - lambda_s0) / h
        if rk == 0:  # h = ∞ (σ_next = 0): unipc_rows refuses the order first
            raise ValueError("UniP of order >= 2 cannot step to sigma = 0")
        rks.append(rk)
        D1s.append((outputs[i] - m0) / rk)
    h_phi_1, B_h, b = _rhs(h, order, bh)
    x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    if D1s:  # no residual term at order 1 (diffusers multiplies B(h) by 0: NaN for bh1 at λ = ∞)
        rhos_p = np.array([0.5]) if order == 2 else np.linalg.solve(_vandermonde(rks, order)[:-1, :-1], b[:-1])
        pred_res = Lin.zero()
        for rho, d in zip(rhos_p, D1s):
            pred_res = pred_res + rho * d
        x_t = x_t - alpha_t * B_h * pred_res
    return x_t


def uni_c(model_t: Lin, last: Lin, outputs: Sequence[Lin], sig: np.ndarray, k: int, order: int, bh: str) -> Lin:
    """diffusers' multistep_uni_c_bh_update at step k: ``model_t`` x̂0 of step k, ``last`` the sample step k − 1
    started from, ``outputs[i]`` x̂0 of step k − 1 − i (model_outputs[-(i+1)] before this step's shift)."""
    alpha_t, sigma_t, lambda_t = _lambda(sig[k])
    alpha_s0, sigma_s0, lambda_s0 = _lambda(sig[k - 1])
    h = lambda_t - lambda_s0
    m0 = outputs[0]
    rks, D1s = [], []
    for i in range(1, order):
        rk = (_lambda(sig[k - (i + 1)])[2] - lambda_s0) / h
        rks.append(rk)
        D1s.append((outputs[i] - m0) / rk)
    h_phi_1, B_h, b = _rhs(h, order, bh)
    rhos_c = np.array([0.5]) if order == 1 else np.linalg.solve(_vandermonde(rks, order), b)
    x_t_ = sigma_t / sigma_s0 * last - alpha_t * h_phi_1 * m0
    corr_res = Lin.zero()
    for rho, d in zip(rhos_c[:-1], D1s):
        corr_res = corr_res + rho * d
    D1_t = model_t - m0
    return x_t_ - alpha_t * B_h * (corr_res + rhos_c[-1] * D1_t)


def unipc_rows(sig: np.ndarray, solver_order: int, solver_type: str, lower_order_final: bool,
               disable_corrector: Sequence[int], where: str = "UniPCMultistepScheduler") -> np.ndarray:
    """The table over the noise levels ``sig`` [K + 1] (diffusers' ``self.sigmas``): diffusers' ``step`` k = 0..K−1
    with its order rules (warm-up, ``lower_order_final``) and corrector rule (``step_index − 1`` not disabled)."""
    sig = np.asarray(sig, dtype=np.float64)
    K = len(sig) - 1
    x, m0 = Lin.of("x"), Lin.of("m0")
    hist = [Lin.of(f"m{j}") for j in range(1, MAX_HISTORY + 1)]
    disabled = set(disable_corrector)
    rows, lower_order_nums, last_order = [], 0, 0
    for k in range(K):
        alpha, sigma_t, _ = _lambda(sig[k])
        a, b = 1.0 / alpha, sigma_t / alpha  # x̂0 = (x − σ_t·ε)/α_t
        if k > 0 and k - 1 not in disabled:
            sample = uni_c(m0, Lin.of("xp"), hist, sig, k, last_order, solver_type)
        else:
            sample = x
        order = min(solver_order, K - k) if lower_order_final else solver_order
        order = min(order, lower_order_nums + 1)
        if sig[k + 1] == 0 and order > 1:
            raise ConfigError(f"{where}: lower_order_final=False with final_sigmas_type 'zero' takes the last step "
                              f"to sigma = 0 at order {order}, where the solver divides by zero (diffusers returns "
                              f"inf or NaN); set lower_order_final=True or final_sigmas_type='sigma_min'")
        x_next = uni_p(sample, [m0, *hist], sig, k, order, solver_type)
        rows.append(row(a, b, x_next, sample, clip=NO_CLIP))
        lower_order_nums = min(lower_order_nums + 1, solver_order)
        last_order = order
    return np.array(rows)
