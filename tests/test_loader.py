"""Checkpoint loading: released names map onto our modules, mismatches are named, the vision tower matches
`transformers`' SigLIP read at the layer the reference reads."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import videoxl
import videoxl.checkpoint.tiny
from videoxl.checkpoint.loader import inspect_checkpoint


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def shard_with(ckpt, name):
    index = json.load(open(os.path.join(ckpt, "model.safetensors.index.json")))
    return os.path.join(ckpt, index["weight_map"][name]), index


def edit_shard(ckpt, name, edit):
    """Apply `edit(tensors)` to the shard holding `name`, keeping the index consistent."""
    path, index = shard_with(ckpt, name)
    tensors = load_file(path)
    before = set(tensors)
    edit(tensors)
    save_file(tensors, path)
    file = os.path.basename(path)
    for n in before - set(tensors):
        del index["weight_map"][n]
    for n in set(tensors) - before:
        index["weight_map"][n] = file
    json.dump(index, open(os.path.join(ckpt, "model.safetensors.index.json"), "w"))


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    ckpt = copy_ckpt(tiny_dir, tmp_path / "c")
    name = "model.layers.1.mlp.up_proj.weight"
    edit_shard(ckpt, name, lambda t: t.pop(name))
    with pytest.raises(videoxl.VideoXLError, match=r"checkpoint does not match the model: 1 missing: "
                                                   r"model\.layers\.1\.mlp\.up_proj\.weight$"):
        videoxl.load(ckpt, device="cpu")
    ok, text = inspect_checkpoint(ckpt)
    assert not ok and "1 missing: model.layers.1.mlp.up_proj.weight" in text


def test_wrong_shape_and_unexpected_are_named(tiny_dir, tmp_path):
    ckpt = copy_ckpt(tiny_dir, tmp_path / "c")
    name = "model.sae.temporal_encoding"

    def edit(t):
        t[name] = torch.zeros(5, 64)
        t["model.mystery.weight"] = torch.zeros(3)
    edit_shard(ckpt, name, edit)
    with pytest.raises(videoxl.VideoXLError) as e:
        videoxl.load(ckpt, device="cpu")
    msg = str(e.value)
    assert "1 unexpected: model.mystery.weight" in msg
    assert "1 with wrong shape: model.sae.temporal_encoding [5, 64] != [4, 64]" in msg
    assert "\n" not in msg


def test_full_vision_tower_with_head_loads(tiny_dir, tmp_path):
    """A folder saved before the reference deleted the last SigLIP layer (plus post_layernorm and head) loads:
    the extra tensors are skipped, and answers are unchanged."""
    ckpt = copy_ckpt(tiny_dir, tmp_path / "c")
    prefix = "model.vision_tower.vision_tower.vision_model."
    name = prefix + "encoder.layers.0.mlp.fc1.weight"

    def edit(t):
        for k in [k for k in t if k.startswith(prefix + "encoder.layers.0.")]:
            t[k.replace("layers.0.", "layers.2.")] = torch.randn_like(t[k])
        t[prefix + "post_layernorm.weight"] = torch.ones(64)
        t[prefix + "head.probe"] = torch.ones(1, 1, 64)
    edit_shard(ckpt, name, edit)
    a, _ = videoxl.load(tiny_dir, device="cpu")
    b, _ = videoxl.load(ckpt, device="cpu")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 3}, "hidden_size (64) must be divisible by num_attention_heads (3)"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"mm_projector_type": "linear"}, "mm_projector_type must be 'mlp2x_gelu'"),
    ({"mm_spatial_pool_mode": "max"}, "mm_spatial_pool_mode must be 'average'"),
])
def test_config_values_out_of_range(tiny_dir, tmp_path, change, message):
    ckpt = copy_ckpt(tiny_dir, tmp_path / "c")
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    cfg.update(change)
    json.dump(cfg, open(os.path.join(ckpt, "config.json"), "w"))
    with pytest.raises(videoxl.VideoXLError) as e:
        videoxl.load(ckpt, device="cpu")
    assert message in str(e.value)


def test_unreadable_folders(tmp_path):
    with pytest.raises(videoxl.VideoXLError, match="checkpoint folder not found"):
        videoxl.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(videoxl.VideoXLError, match="checkpoint has no config.json"):
        videoxl.load(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{}")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(videoxl.VideoXLError, match="config.json is not valid JSON"):
        videoxl.load(str(bad))
    (bad / "config.json").write_text(json.dumps(videoxl.checkpoint.tiny.tiny_config().to_dict()))
    (bad / "tokenizer.json").unlink()
    with pytest.raises(videoxl.VideoXLError, match="no tokenizer files"):
        videoxl.load(str(bad))


def test_siglip_matches_transformers(tiny):
    """Our tower = `transformers`' SiglipVisionModel read at hidden_states[layers_run]: the output of the
    second-to-last layer, before post_layernorm (what the reference's layer deletion leaves)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model, _ = tiny
    v = model.config.vision
    hf_cfg = SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                                image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps)
    hf = SiglipVisionModel(hf_cfg).eval()
    # transformers 4.x keys carry a `vision_model.` prefix, 5.x do not
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf.state_dict()) else ""
    ours = {prefix + k: t for k, t in model.vision.tower.state_dict().items()}
    missing, unexpected = hf.load_state_dict(ours, strict=False)
    assert not unexpected
    assert all(".layers.2." in m or "post_layernorm" in m or "head" in m for m in missing), missing
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, v.image_size, v.image_size) * 2 - 1
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[v.layers_run]
        got = model.vision.tower(pixels)
    assert (got - ref).abs().max() < 1e-4
