"""The public API of transformers' DacModel, DacConfig and DacFeatureExtractor, introspected from the installed
transformers: every public name and every keyword of the constructors, ``__call__``, ``from_pretrained`` and
the other methods users call is either provided by dac_fast or named in OMITTED with the reason. The same
table is in README.md ("Differences from transformers"); a test keeps the two in step."""

import inspect
import pathlib
import re

import pytest

import dac_fast
from dac_fast.configuration import _IGNORED_KEYS
from dac_fast.hub import PUSH_KWARGS
from dac_fast.hub import HUB_KWARGS
from dac_fast.loading import load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

_REASONS = {
    "peft": "PEFT adapters (adapters, input-grad hooks for adapter training): DAC has no adapter support",
    "distributed": "tensor/pipeline/FSDP/expert/context parallel plans and sharded or distributed checkpoints: "
                   "the model is small and loads whole on one device",
    "attention": "attention, experts, kernels-hub and compile implementations: DAC has no attention layers",
    "embeddings": "token/position embedding accessors and tied weights: DAC has no token embeddings or tied weights",
    "text": "text-model config fields (labels, rope, per-layer attributes, sub-configs, token ids): DAC has none",
    "auto": "Auto-class registration, remote code and model tags: for models defined outside transformers' hub code",
    "init": "transformers' lazy-initialization machinery (DacModel initializes in its constructor)",
    "loading": "from_pretrained options for sharded, variant or quantized checkpoints (bitsandbytes, fusion, "
               "mmap): DAC checkpoints are one safetensors file",
    "outputs": "hidden-state/attention outputs and problem types: DAC returns its own outputs only",
    "internals": "transformers' internal helpers (config dict plumbing, validation hooks, dtype bookkeeping)",
    "audio_io": "URL/file audio fetching in the extractor: use dac_fast.io.read_audio or encode_files",
    "checkpointing": "gradient checkpointing every n-th layer or with CPU offload: dac_fast checkpoints every "
                     "encoder and decoder block",
}

# name -> reason key. A name is omitted wherever it appears (method, attribute or keyword); "Class.name" only there.
OMITTED = {
    **dict.fromkeys(["active_adapters", "add_adapter", "delete_adapter", "disable_adapters", "enable_adapters",
                     "get_adapter_state_dict", "load_adapter", "set_adapter", "enable_peft_hotswap",
                     "enable_input_require_grads", "disable_input_require_grads", "save_peft_format"], "peft"),
    **dict.fromkeys(["barrier_after_gathered_checkpoint_save", "fsdp_plan", "fsdp_size",
                     "gather_sharded_state_dict_for_save",
                     "init_parallel_plans", "maybe_distribute_model", "pp_plan", "prepare_distribute_model",
                     "save_distributed_checkpoint", "should_save_on_this_rank", "supports_context_parallel",
                     "supports_pp_plan", "supports_tp_plan", "tp_plan", "tp_size", "base_model_ep_plan",
                     "base_model_fsdp_plan", "base_model_pp_plan", "base_model_tp_plan", "distributed_checkpoint",
                     "is_main_process", "max_shard_size"], "distributed"),
    **dict.fromkeys(["get_correct_attn_implementation", "get_correct_experts_implementation",
                     "get_experts_implementation", "set_attn_implementation", "set_experts_implementation",
                     "set_use_kernels", "use_kernels", "get_compiled_call", "is_backend_compatible",
                     "can_record_outputs", "warn_if_padding_and_no_attention_mask", "chunk_size_feed_forward",
                     "kernel_config"],
                    "attention"),
    **dict.fromkeys(["get_input_embeddings", "set_input_embeddings", "get_output_embeddings", "set_output_embeddings",
                     "get_position_embeddings", "resize_position_embeddings", "resize_token_embeddings",
                     "tie_weights", "get_expanded_tied_weights_keys", "mark_tied_weights_as_initialized",
                     "set_decoder", "set_encoder", "all_tied_weights_keys"], "embeddings"),
    **dict.fromkeys(["id2label", "label2id", "num_labels", "problem_type", "rope_scaling",
                     "convert_rope_params_to_dict", "default_rope_type", "default_theta",
                     "ignore_keys_at_rope_validation", "nested_rope_parameter_keys",
                     "standardize_rope_params", "validate_rope", "per_layer_attributes", "per_layer_config",
                     "allow_global_per_layer_attribute_access", "serialize_explicit_per_layer_config",
                     "validate_layer_type", "is_heterogeneous", "sub_configs", "get_text_config", "get_mtp_config",
                     "validate_token_ids", "base_config_key", "is_encoder_decoder", "keys_to_ignore_at_inference",
                     "generation_config_class", "input_modalities", "loss_function", "loss_type", "dummy_inputs"],
                    "text"),
    **dict.fromkeys(["register_for_auto_class", "is_custom_code", "is_remote_code", "add_model_tags", "model_tags",
                     "tags", "transformers_version", "architectures", "name_or_path"], "auto"),
    **dict.fromkeys(["get_init_context", "init_weights", "initialize_weights", "post_init",
                     "has_no_defaults_at_init"], "init"),
    **dict.fromkeys(["ignore_mismatched_sizes", "use_safetensors", "weights_only", "fusion_config", "disable_mmap",
                     "dequantize", "variant", "save_original_format", "retrieve_modules_from_names",
                     "named_non_persistent_buffers", "get_parameter_or_buffer"],
                    "loading"),
    **dict.fromkeys(["output_hidden_states", "output_attentions", "validate_output_attentions"], "outputs"),
    **dict.fromkeys(["attribute_map", "dict_dtype_to_str", "get_config_dict", "update_from_string", "validate",
                     "validate_architecture", "DacConfig.dtype", "DacConfig.torch_dtype", "get_feature_extractor_dict"],
                    "internals"),
    **dict.fromkeys(["fetch_audio"], "audio_io"),
    **dict.fromkeys(["every_n_layers", "offload"], "checkpointing"),
}


def public_names(obj):
    return {n for n in dir(obj) if not n.startswith("_")}


def omitted_for(cls_name):
    return {name.split(".")[-1] for name in OMITTED if "." not in name or name.startswith(cls_name + ".")}


def tiny_configs():
    fields = dict(encoder_hidden_size=4, downsampling_ratios=[2, 2], decoder_hidden_size=8, n_codebooks=2,
                  codebook_size=4, codebook_dim=2)
    return transformers.DacConfig(**fields), dac_fast.DacConfig(**fields)


def instances():
    """(transformers object, dac_fast object) pairs: instances, so dataclass fields and module attributes count."""
    hf_config, config = tiny_configs()
    return {
        "DacConfig": (hf_config, config),
        "DacModel": (transformers.DacModel(hf_config), dac_fast.DacModel(config)),
        "DacFeatureExtractor": (transformers.DacFeatureExtractor(), dac_fast.DacFeatureExtractor()),
    }


@pytest.mark.parametrize("name", ["DacConfig", "DacModel", "DacFeatureExtractor"])
def test_every_public_name_is_provided_or_omitted_with_a_reason(name):
    ref, ours = instances()[name]
    missing = sorted(public_names(ref) - public_names(ours) - omitted_for(name))
    assert not missing, f"{name}: transformers has {missing}; provide them or add them to OMITTED with a reason"
    # names omitted but provided after all would make the table lie
    assert not sorted(omitted_for(name) & public_names(ours) & public_names(ref)), "provided names listed in OMITTED"


def keywords(function):
    return {p.name for p in inspect.signature(function).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in ("self", "cls")}


# (class, method, the keywords dac_fast accepts besides its signature's: through **kwargs)
METHODS = [
    ("DacConfig", "__init__", _IGNORED_KEYS), ("DacConfig", "from_pretrained", HUB_KWARGS),
    ("DacConfig", "save_pretrained", PUSH_KWARGS), ("DacConfig", "push_to_hub", PUSH_KWARGS),
    ("DacConfig", "to_json_string", ()), ("DacConfig", "to_json_file", ()), ("DacConfig", "from_dict", ()),
    ("DacModel", "__init__", ()), ("DacModel", "from_pretrained", {*HUB_KWARGS, *keywords(load_pretrained)}),
    ("DacModel", "save_pretrained", {*PUSH_KWARGS, *keywords(save_pretrained)}),
    ("DacModel", "push_to_hub", PUSH_KWARGS),
    ("DacModel", "encode", ()), ("DacModel", "decode", ()), ("DacModel", "forward", ()),
    ("DacModel", "num_parameters", ()), ("DacModel", "get_memory_footprint", ()),
    ("DacModel", "gradient_checkpointing_enable", ()),
    ("DacFeatureExtractor", "__init__", ()), ("DacFeatureExtractor", "__call__", ()),
    ("DacFeatureExtractor", "pad", ()), ("DacFeatureExtractor", "from_pretrained", HUB_KWARGS),
    ("DacFeatureExtractor", "save_pretrained", PUSH_KWARGS), ("DacFeatureExtractor", "push_to_hub", PUSH_KWARGS),
    ("DacFeatureExtractor", "to_json_file", ()), ("DacFeatureExtractor", "from_dict", ()),
]

@pytest.mark.parametrize("cls_name, method, extra", METHODS, ids=lambda v: v if isinstance(v, str) else "")
def test_every_keyword_is_accepted_or_omitted_with_a_reason(cls_name, method, extra):
    ref = keywords(getattr(getattr(transformers, cls_name), method))
    ours = keywords(getattr(getattr(dac_fast, cls_name), method)) | set(extra)
    missing = sorted(ref - ours - omitted_for(cls_name))
    assert not missing, f"{cls_name}.{method}: transformers takes {missing}; accept them or list them in OMITTED"


def test_gradient_checkpointing_options_are_named_errors():
    """every_n_layers / offload (transformers' newer checkpointing options) are rejected by name, not ignored."""
    model = dac_fast.DacModel(tiny_configs()[1])
    with pytest.raises(TypeError, match="every_n_layers"):
        model.gradient_checkpointing_enable(every_n_layers=2)


def test_omitted_names_are_refused_clearly():
    """An omitted keyword is a TypeError naming it (never silently ignored)."""
    _, config = tiny_configs()
    model = dac_fast.DacModel(config)
    with pytest.raises(TypeError, match="max_shard_size"):
        model.save_pretrained("unused", max_shard_size="1GB")
    with pytest.raises(TypeError, match="use_safetensors"):
        dac_fast.DacModel.from_pretrained("unused", use_safetensors=True)


def test_every_omission_exists_in_transformers():
    """The table names only what transformers has (a stale entry would hide nothing and mislead)."""
    known = set()
    for ref, _ in instances().values():
        known |= public_names(ref)
    for cls_name, method, _ in METHODS:
        known |= keywords(getattr(getattr(transformers, cls_name), method))
    assert not sorted({name.split(".")[-1] for name in OMITTED} - known)


def test_readme_lists_every_omission():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = re.search(r"^## Differences from transformers\n(.*?)(?=^## )", readme, re.S | re.M)
    assert section, "README needs a 'Differences from transformers' section"
    absent = sorted(name for name in OMITTED if f"`{name}`" not in section.group(1))
    assert not absent, f"README's Differences section does not name {absent}"
