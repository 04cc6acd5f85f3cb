"""snncc's compiler passes, one module each (installed as ``snncc.passes``).

Each pass is a plain function named ``verb_noun`` whose docstring says what it requires and guarantees.
Their order lives in :func:`snncc.pipeline.compile_graph`.
"""
from .hoist_time_invariant import hoist_time_invariant
from .fold_matmul_scale import fold_matmul_scale, scaled_matmul
from .tag_timesteps import NodeTag, tag_timesteps
from .batch_over_time import Group, batch_over_time
from .build_task_graph import build_task_graph
from .fuse_conv_bn_neuron import fuse_conv_bn_neuron
from .insert_bitpack import insert_bitpack
from .schedule_layer_major import schedule_layer_major, schedule_wavefront
from .choose_chunk import ChunkChoice, LayerCost, choose_chunk, layer_costs
from .plan_memory import LayerPlan, MemoryPlan, ScanCost, plan_memory

__all__ = ["hoist_time_invariant", "fold_matmul_scale", "scaled_matmul", "tag_timesteps", "NodeTag", "batch_over_time", "Group",
           "build_task_graph", "fuse_conv_bn_neuron", "insert_bitpack", "schedule_layer_major",
           "schedule_wavefront", "choose_chunk", "layer_costs", "LayerCost", "ChunkChoice",
           "plan_memory", "ScanCost", "LayerPlan", "MemoryPlan"]
