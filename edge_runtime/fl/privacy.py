"""Privacy accounting of client-level DP rounds with Google's `dp-accounting` (RDP).

One round of `fl.dp` is a subsampled Gaussian mechanism: the server draws k of the N
eligible devices uniformly without replacement (`AggregatorService._select`), sums their
clipped changes (norm <= C) and adds N(0, (z C)^2) to every coordinate. Fixed-size
sampling is accounted under *replace-one* adjacency (one device's data swapped for
other data; N and k are public), where the sum's L2 sensitivity is 2C, not C: the
Gaussian event the accountant sees has noise multiplier z / 2 (std over sensitivity).

    round t:  SampledWithoutReplacementDpEvent(N_t, k_t, GaussianDpEvent(z / 2))
              (k_t = N_t, or a round whose selection was extended at its deadline:
               GaussianDpEvent(z / 2) alone: no amplification claimed)
    run:      ComposedDpEvent of the rounds so far

and epsilon at `delta` comes from `dp_accounting.rdp.RdpAccountant` (Wang, Balle,
Kasiviswanathan, "Subsampled Renyi Differential Privacy and Analytical Moments
Accountant", AISTATS 2019, Theorem 27, for the sampled rounds). The library is the
optional extra `dp` (`pip install edge-runtime[dp]`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge_runtime.errors import ConfigError

__all__ = ["RoundSampling", "round_event", "epsilon", "accountant_noise_multiplier",
           "dp_round_record", "require_accountant"]

#: replace-one adjacency doubles the sum's sensitivity (module docstring)
SENSITIVITY_FACTOR = 2.0


@dataclass(frozen=True)
class RoundSampling:
    """Who could have been in a round: k selected out of a pool of N eligible devices;
    `amplified` False where the selection was not one uniform draw (an extended round)."""

    pool: int
    selected: int
    amplified: bool = True


def require_accountant() -> Any:
    """The `dp_accounting` module, or a ConfigError saying how to install it."""
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError("fleet.dp needs the privacy accountant: pip install "
                          "'edge-runtime[dp]' (dp-accounting)") from None
    return dp_accounting


def accountant_noise_multiplier(noise_multiplier: float) -> float:
    """z / 2: the noise std over the replace-one sensitivity 2C (module docstring)."""
    return noise_multiplier / SENSITIVITY_FACTOR


def round_event(noise_multiplier: float, sampling: RoundSampling) -> Any:
    """The dp_accounting event of one round (module docstring)."""
    dpa = require_accountant()
    gauss = dpa.GaussianDpEvent(accountant_noise_multiplier(noise_multiplier))
    if not sampling.amplified or sampling.selected >= sampling.pool:
        return gauss
    return dpa.SampledWithoutReplacementDpEvent(sampling.pool, sampling.selected, gauss)


def epsilon(noise_multiplier: float, rounds: Sequence[RoundSampling], delta: float) -> float:
    """Epsilon at `delta` of the composition of `rounds` (RDP accountant, replace-one)."""
    dpa = require_accountant()
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    counts = Counter(rounds)  # equal rounds compose as one self-composed event (faster)
    acc.compose(dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(round_event(noise_multiplier, r), n)
                                     for r, n in sorted(counts.items(), key=lambda x: str(x[0]))]))
    return float(acc.get_epsilon(delta))


def _sampling(rec: dict[str, Any]) -> RoundSampling:
    return RoundSampling(int(rec["pool"]), int(rec["selected"]), bool(rec["amplified"]))


def dp_round_record(clip: float, noise_multiplier: float, delta: float,
                    previous: Sequence[dict[str, Any] | None], sampling: RoundSampling,
                    clipped: int, participants: int) -> dict[str, Any]:
    """The metrics record's `dp` entry for a closed round: this round's epsilon alone and
    the run's so far (`previous`: the earlier rounds' `dp` entries, None where DP was off,
    which cannot happen in one run: the state refuses a changed config)."""
    history = [_sampling(p) for p in previous if p is not None] + [sampling]
    return {"epsilon": epsilon(noise_multiplier, history, delta),
            "epsilon_round": epsilon(noise_multiplier, [sampling], delta),
            "delta": delta, "noise_multiplier": noise_multiplier,
            "accountant_noise_multiplier": accountant_noise_multiplier(noise_multiplier),
            "clip": clip, "pool": sampling.pool, "selected": sampling.selected,
            "amplified": sampling.amplified, "clipped": clipped,
            "participants": participants, "accountant": "rdp (dp-accounting), replace-one"}
