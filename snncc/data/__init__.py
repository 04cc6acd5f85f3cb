"""Data helpers for SNN workloads: event-camera streams to frames, event datasets, synthetic gestures;
spike audio in the Spiking Heidelberg Digits layout (700 channels) binned to time steps.

See :mod:`snncc.data.events` for the slicing conventions (SpikingJelly's), :mod:`snncc.data.shd` for SHD's
file layout and the binning rule.
"""
from .events import (EVENT_DTYPE, EventFrames, NpzEventDataset, events_to_frames, frame_slices,
                     save_npz_events, synthetic_gestures, time_first_collate, tonic_dataset)
from .shd import (SHD_CHANNELS, SHD_CLASSES, SHD_URL, SpikeAudio, SpikeRecordings, bin_batch, bin_events,
                  generated_shd, load_shd)

__all__ = ["EVENT_DTYPE", "events_to_frames", "frame_slices", "EventFrames", "NpzEventDataset",
           "save_npz_events", "tonic_dataset", "synthetic_gestures", "time_first_collate",
           "SHD_CHANNELS", "SHD_CLASSES", "SHD_URL", "SpikeRecordings", "load_shd", "generated_shd", "bin_events",
           "bin_batch", "SpikeAudio"]
