import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ablate.errors import InputError
from ablate.model.backbone import Backbone, BackboneConfig
from ablate.model.checkpoint import CONFIG_KEY, load_backbone, save_backbone
from ablate.model.student import EngramConfig, Student

CFG = BackboneConfig(vocab_size=64, hidden_dim=32, num_layers=2, num_query_heads=2,
                     num_kv_heads=1, head_dim=16, ffn_dim=48, max_seq_len=16, layers_per_block=1)


def backbone(seed=0):
    torch.manual_seed(seed)
    return Backbone(CFG).eval()


def bare_tensors(bb):
    return {k: v.contiguous() for k, v in bb.state_dict().items()}


def logits(bb):
    x = torch.arange(10).reshape(1, 10) % 64
    with torch.no_grad():
        return bb.logits(bb(x))


def test_round_trip_gives_identical_logits_and_stores_config(tmp_path):
    bb = backbone()
    path = tmp_path / "sub" / "bb.safetensors"
    save_backbone(bb, path)
    assert [p.name for p in path.parent.iterdir()] == ["bb.safetensors"]  # no temp file left
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()[CONFIG_KEY]) == CFG.to_dict()
    state = torch.random.get_rng_state()
    loaded = load_backbone(path).eval()
    assert torch.equal(torch.random.get_rng_state(), state)  # loading leaves the RNG alone
    assert loaded.config == CFG
    assert torch.equal(logits(loaded), logits(bb))
    assert torch.equal(logits(load_backbone(path, expected=CFG)), logits(bb))


def test_student_state_dict_with_prefix_loads_and_ignores_engram_keys(tmp_path):
    bb = backbone()
    student = Student(bb, EngramConfig(inject_layers=(1,), engram_dim=8, num_heads=2, top_k=2,
                                       router=True), torch.randn(10, 8))
    tensors = {k: v.contiguous() for k, v in student.state_dict().items()}
    assert any(k.startswith("engram_skip_router.") for k in tensors)
    save_file(tensors, str(tmp_path / "s.safetensors"))
    loaded = load_backbone(tmp_path / "s.safetensors", expected=CFG)
    assert torch.equal(logits(loaded), logits(bb))


def test_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(InputError, match="nope.safetensors.*pretrain"):
        load_backbone(tmp_path / "nope.safetensors", expected=CFG)


def test_corrupt_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_backbone(garbage, expected=CFG)
    good = tmp_path / "good.safetensors"
    save_backbone(backbone(), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_backbone(truncated)


def test_no_stored_config_needs_expected(tmp_path):
    path = tmp_path / "raw.safetensors"
    bb = backbone()
    save_file(bare_tensors(bb), str(path))
    with pytest.raises(InputError, match="guessed"):
        load_backbone(path)
    assert torch.equal(logits(load_backbone(path, expected=CFG)), logits(bb))


def test_config_mismatch_names_field_and_values(tmp_path):
    path = tmp_path / "bb.safetensors"
    save_backbone(backbone(), path)
    other = BackboneConfig.from_dict({**CFG.to_dict(), "rope_theta": 1e4})
    with pytest.raises(InputError, match=r"rope_theta: checkpoint has 1000000.0, expected 10000.0"):
        load_backbone(path, expected=other)


def test_missing_backbone_tensor_is_listed(tmp_path):
    tensors = bare_tensors(backbone())
    del tensors["layers.1.mlp.up_proj.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InputError, match="layers.1.mlp.up_proj.weight"):
        load_backbone(path, expected=CFG)


def test_unexpected_keys_are_errors_unless_ignored(tmp_path):
    tensors = bare_tensors(backbone())
    path = tmp_path / "extra.safetensors"
    save_file({**tensors, "engram.weight": torch.zeros(3)}, str(path))
    load_backbone(path, expected=CFG)  # "engram." is whitelisted
    save_file({**tensors, "lm_head.weight": torch.zeros(3)}, str(path))
    with pytest.raises(InputError, match="lm_head.weight"):
        load_backbone(path, expected=CFG)
    prefixed = {f"backbone.{k}": v for k, v in tensors.items()}
    save_file({**prefixed, "stray.weight": torch.zeros(3)}, str(path))
    with pytest.raises(InputError, match="stray.weight"):
        load_backbone(path, expected=CFG)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    tensors = bare_tensors(backbone())
    tensors["final_norm.weight"] = torch.ones(31)
    path = tmp_path / "shape.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InputError, match=r"final_norm.weight: checkpoint \(31,\), model \(32,\)"):
        load_backbone(path, expected=CFG)


def test_invalid_stored_config_is_an_input_error(tmp_path):
    path = tmp_path / "badcfg.safetensors"
    save_file(bare_tensors(backbone()), str(path),
              metadata={CONFIG_KEY: json.dumps({**CFG.to_dict(), "wings": 2})})
    with pytest.raises(InputError, match="wings"):
        load_backbone(path)
