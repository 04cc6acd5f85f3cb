"""Data helpers for SNN workloads: event-camera streams to frames, event datasets, synthetic gestures.

See :mod:`snncc.data.events` for the slicing conventions (SpikingJelly's).
"""
from .events import (EVENT_DTYPE, EventFrames, NpzEventDataset, events_to_frames, frame_slices,
                     save_npz_events, synthetic_gestures, time_first_collate, tonic_dataset)

__all__ = ["EVENT_DTYPE", "events_to_frames", "frame_slices", "EventFrames", "NpzEventDataset",
           "save_npz_events", "tonic_dataset", "synthetic_gestures", "time_first_collate"]
