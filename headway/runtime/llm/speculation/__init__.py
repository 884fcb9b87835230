"""Speculative decoding, lossless: proposers (n-gram lookup, draft model), verification by one
target forward with rejection sampling, and a proposal length that follows acceptance."""

from headway.runtime.llm.speculation.config import SpeculativeConfig
from headway.runtime.llm.speculation.speculator import Speculator, StepStats

__all__ = ["SpeculativeConfig", "Speculator", "StepStats"]
