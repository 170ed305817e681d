"""HF <-> Megatron conversion: one mapping table per family, streaming export and sliced import."""

from megaopsd.convert.dist_ckpt import (
    in_process_write_results,
    load_model_checkpoint,
    model_sharded_state_dict,
    save_model_checkpoint,
)
from megaopsd.convert.export import ExportItem, ExportPlan, export_hf_weights, export_plan
from megaopsd.convert.families import FAMILIES, FamilyMapping, Rule, hf_tensor_names, mapping_for
from megaopsd.convert.importer import load_hf_weights
from megaopsd.convert.safetensors_io import HFCheckpointReader, StreamingSafetensorsWriter, copy_side_files

__all__ = [
    "FAMILIES",
    "ExportItem",
    "ExportPlan",
    "FamilyMapping",
    "HFCheckpointReader",
    "Rule",
    "StreamingSafetensorsWriter",
    "copy_side_files",
    "export_hf_weights",
    "export_plan",
    "hf_tensor_names",
    "in_process_write_results",
    "load_hf_weights",
    "load_model_checkpoint",
    "mapping_for",
    "model_sharded_state_dict",
    "save_model_checkpoint",
]
