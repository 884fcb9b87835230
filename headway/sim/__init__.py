"""The fleet simulator: a deployment under a trace, in simulated time, driving the very
autoscaling and routing policy objects the control plane runs (see `run.simulate`).

    python -m headway.sim --trace bursty --policy all --duration 3600
"""

from headway.sim.compare import compare
from headway.sim.run import RunResult, SimConfig, simulate

__all__ = ["RunResult", "SimConfig", "compare", "simulate"]
