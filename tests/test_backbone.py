import pytest
import torch

from prism_lightning.backbone import (
    BackboneConfig,
    ModelNotFoundError,
    _drop_gguf_quantization_config,
    contiguous_lm_head_input,
    inference_dtype,
    load_backbone,
    resolve_dtype,
)


def test_local_directory_loads_in_eval_mode_fp32_on_cpu(tiny_backbone):
    assert tiny_backbone.model.training is False
    assert next(tiny_backbone.model.parameters()).dtype == torch.float32
    assert tiny_backbone.tokenizer.padding_side == "left"
    assert tiny_backbone.tokenizer.pad_token is not None
    assert tiny_backbone.num_layers == 4


def test_backbone_config_honours_dtype(tiny_model_dir):
    bb = BackboneConfig(model=str(tiny_model_dir), dtype="bfloat16").load("cpu")
    assert next(bb.model.parameters()).dtype == torch.bfloat16


def test_auto_dtype_is_bf16_on_gpu_and_fp32_on_cpu():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("float8", "cpu")


def test_lm_head_input_is_made_contiguous_and_logits_are_unchanged(tiny_model_dir):
    bb = BackboneConfig(model=str(tiny_model_dir), dtype="bfloat16").load("cpu")
    head = bb.model.get_output_embeddings()
    seen = []
    head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    with torch.no_grad():
        full = bb.model(input_ids=ids).logits[:, -1]
        last = bb.model(input_ids=ids, logits_to_keep=1).logits[:, -1]
    assert seen == [True, True]  # the strided last-position slice reached the head contiguous
    assert torch.equal(full, last)
    n_hooks = len(head._forward_pre_hooks)
    contiguous_lm_head_input(bb.model)  # idempotent
    assert len(head._forward_pre_hooks) == n_hooks


def test_inference_dtype_auto(monkeypatch):
    import prism_lightning.backbone as bb

    assert inference_dtype("float32", "cuda") == "float32"  # an explicit choice passes through
    assert inference_dtype("auto", "cuda") == "bfloat16"
    monkeypatch.setattr(bb, "cpu_has_fast_bf16", lambda: True)
    assert inference_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(bb, "cpu_has_fast_bf16", lambda: False)
    assert inference_dtype("auto", "cpu") == "float32"


def test_converted_config_loses_only_the_gguf_quantization_entry(tmp_path):
    import json

    path = tmp_path / "config.json"
    gguf = {"quant_method": "gguf", "gguf_file": "m.gguf", "dequantize": False}
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "quantization_config": gguf}))
    _drop_gguf_quantization_config(path)
    assert json.loads(path.read_text()) == {"model_type": "llama", "hidden_size": 8}
    other = {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes"}}
    path.write_text(json.dumps(other))
    _drop_gguf_quantization_config(path)
    assert json.loads(path.read_text()) == other


def test_wrong_model_names_what_was_tried(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as info:
        load_backbone(str(missing), device="cpu")
    message = str(info.value)
    assert "smollm2-135m-instruct" in message  # embedded names listed
    assert str(missing) in message  # the local path tried
    assert "hub" in message.lower()


def test_hub_id_offline_fails_fast_with_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        load_backbone("some-org/definitely-not-a-model", device="cpu")


def test_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_backbone(str(tmp_path), device="cpu")


def test_trust_remote_code_is_off_by_default():
    assert BackboneConfig().trust_remote_code is False
