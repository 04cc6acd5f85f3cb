"""snncc's runtime (installed as ``snncc.runtime``): executes a Schedule on a backend.

``reference`` is plain torch on any device: the oracle for every other backend.
"""
from .executor import Executor, TaskObserver
from .reference import neuron_scan

__all__ = ["Executor", "TaskObserver", "neuron_scan"]
