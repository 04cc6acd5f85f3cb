"""snncc: a graph compiler for spiking neural networks written in PyTorch step mode.

    cmodel = snncc.compile(model, T=8)   # drop-in nn.Module, same parameters, same numbers, faster

``import snncc`` imports neither cupy, spikingjelly nor snntorch.
"""
from . import data, losses, neurons, surrogate
from .compiled import CompiledModule, Stream, compile, reset
from .errors import InputError, SNNCCError, TaskFailure, TraceFailure
from .explain import Explanation, explain
from .neurons import IF, LIF, AdaptiveLIF, Izhikevich, ParametricLIF

__version__ = "0.1.0"
__all__ = ["compile", "reset", "explain", "Explanation", "CompiledModule", "neurons", "surrogate", "losses", "data",
           "IF", "LIF", "ParametricLIF", "Izhikevich", "AdaptiveLIF", "SNNCCError", "TraceFailure", "InputError", "TaskFailure"]
