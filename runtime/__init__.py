"""snncc's runtime (installed as ``snncc.runtime``): executes a Schedule on a backend.

Backends claim the scans they can run (``dispatch``: cuda, cpu, reference, asked in that order);
``reference`` is plain torch on any device: the oracle for every other backend, importing none of them.
"""
from .executor import Executor, TaskObserver
from .dispatch import neuron_scan

__all__ = ["Executor", "TaskObserver", "neuron_scan"]
