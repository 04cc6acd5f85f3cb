"""Errors snncc raises. Each names the model's module (or argument) at fault and what to do about it."""
from __future__ import annotations

__all__ = ["SNNCCError", "TraceFailure", "InputError", "TaskFailure"]


class SNNCCError(RuntimeError):
    """Base class of snncc's errors."""


class TraceFailure(SNNCCError):
    """The model could not be traced with torch.fx (data-dependent control flow, unsupported Python)."""


class InputError(SNNCCError, ValueError):
    """A call's input does not fit the compiled form (rank, time dimension, T)."""


class TaskFailure(SNNCCError):
    """A module of the model failed while the compiled schedule ran it."""
