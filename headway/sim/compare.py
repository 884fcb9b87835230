"""Several autoscaling policies, one trace, the same fleet and router: the side-by-side runs.

Each policy gets a fresh policy object and a fresh router policy with the same seed, and the
fleet starts with the same ready replicas (by default what the oracle holds at t=0), so the
rows differ only by the autoscaler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from headway.infra.autoscale.policy import POLICIES
from headway.infra.autoscale.types import AutoscaleConfig, AutoscalePolicy
from headway.infra.router.policies import make_policy
from headway.sim.arrivals import Trace
from headway.sim.oracle import Oracle, oracle_schedule
from headway.sim.report import Summary, summarize, with_oracle_ratio
from headway.sim.run import SimConfig, simulate
from headway.sim.service import ServiceModel

AUTOSCALERS = (*POLICIES, "oracle")


def make_autoscaler(name: str, config: AutoscaleConfig, schedule: list[int] | None = None) -> AutoscalePolicy:
    if name == "oracle":
        if schedule is None:
            raise ValueError("the oracle needs its schedule (oracle_schedule)")
        return Oracle(schedule)
    try:
        return POLICIES[name](config)
    except KeyError:
        raise ValueError(f"unknown autoscaling policy '{name}'; choose from: {', '.join(AUTOSCALERS)}, all") from None


def compare(trace: Trace, names: Sequence[str], config: AutoscaleConfig, sim: SimConfig, model: ServiceModel, *,
            router: str = "least-load", initial_replicas: int | None = None) -> list[Summary]:
    """One row per policy name, in the order given, with replica-seconds against the oracle's."""
    for name in names:
        make_autoscaler(name, config, [0])  # unknown names fail before any run
    schedule = oracle_schedule(trace, model, config.target_concurrency, sim.startup_s, sim.tick_s)
    start = schedule[0] if initial_replicas is None else initial_replicas
    sim = replace(sim, initial_replicas=min(start, config.max_replicas))
    rows = []
    for name in names:
        result = simulate(trace, make_autoscaler(name, config, schedule), make_policy(router, seed=sim.seed), sim,
                          model, window_s=config.window_s)
        rows.append(summarize(result, sim.ttft_objective_s, sim.tpot_objective_s))
    return with_oracle_ratio(rows)
