"""LoRA via PEFT: settings, trainable parameters, and PEFT-format save/reload."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tensafe.training.errors import ModelLoadError, TrainingConfigError, TrainingError
from tensafe.training.lora import DEFAULT_TARGET_MODULES, LoraSettings, apply_lora, load_adapter, save_adapter


def _randomise_lora(model: Any, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def test_defaults() -> None:
    s = LoraSettings()
    assert (s.rank, s.alpha, s.dropout) == (8, 16.0, 0.0)
    assert s.target_modules == DEFAULT_TARGET_MODULES
    assert s.scaling == 2.0
    cfg = s.to_peft_config()
    assert cfg.r == 8 and cfg.lora_alpha == 16 and set(cfg.target_modules) == set(DEFAULT_TARGET_MODULES)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": 0},
        {"rank": 2.5},
        {"rank": True},
        {"alpha": 0},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"target_modules": ()},
        {"target_modules": "q_proj"},
        {"target_modules": ("q_proj", "q_proj")},
    ],
)
def test_invalid_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(TrainingConfigError):
        LoraSettings(**kwargs)


def test_trainable_parameters_match_lora_formula(tiny_llama: Any) -> None:
    cfg = tiny_llama.config
    model = apply_lora(tiny_llama, LoraSettings(rank=4, alpha=8), init_seed=0)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    h, i, kv = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads),
    )
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    expected = cfg.num_hidden_layers * sum(4 * (fan_in + fan_out) for fan_in, fan_out in shapes.values())
    assert sum(p.numel() for p in trainable.values()) == expected


def test_fresh_adapter_is_identity_and_seeded(tiny_llama_factory: Any) -> None:
    base = tiny_llama_factory()
    ids = torch.tensor([[1, 5, 9, 200, 4000]])
    with torch.no_grad():
        ref = base(ids).logits
    a = apply_lora(tiny_llama_factory(), init_seed=3)
    b = apply_lora(tiny_llama_factory(), init_seed=3)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, ref)  # B = 0 at initialisation.
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if "lora_A" in k)


def test_unknown_target_module_is_refused(tiny_llama: Any) -> None:
    with pytest.raises(TrainingConfigError, match="not found in the model: qkv_proj"):
        apply_lora(tiny_llama, LoraSettings(target_modules=("q_proj", "qkv_proj")))


def test_save_then_plain_peft_reload_gives_identical_outputs(
    tiny_tokenizer: Any, tiny_llama_factory: Any, tmp_path: pathlib.Path
) -> None:
    from peft import PeftModel  # Plain PEFT, as a user or vLLM would load it.

    model = apply_lora(
        tiny_llama_factory(),
        LoraSettings(rank=4, alpha=8, target_modules=("q_proj", "down_proj")),
        init_seed=0,
    )
    _randomise_lora(model)
    model.eval()
    out = save_adapter(model, tmp_path / "adapter", base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "down_proj"}
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in weights)
    assert len(weights) == 2 * 2 * 2  # layers x modules x (A, B)

    reloaded = PeftModel.from_pretrained(tiny_llama_factory(), str(out))
    reloaded.eval()
    ids = torch.tensor([tiny_tokenizer("Patient: Jane Doe; MRN: 1234567").input_ids])
    with torch.no_grad():
        expected = model(ids).logits
        got = reloaded(ids).logits
        base = tiny_llama_factory()(ids).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, base)  # The adapter really changes the model.

    mine = load_adapter(tiny_llama_factory(), out, is_trainable=True)
    assert any(p.requires_grad for p in mine.parameters())
    with torch.no_grad():
        assert torch.equal(mine.eval()(ids).logits, expected)


def test_save_is_atomic_and_refuses_overwrite(
    tiny_llama: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = apply_lora(tiny_llama, init_seed=0)
    target = tmp_path / "adapter"
    save_adapter(model, target)
    with pytest.raises(TrainingError, match="already exists"):
        save_adapter(model, target)
    _randomise_lora(model, seed=9)
    save_adapter(model, target, overwrite=True)
    saved = load_file(str(target / "adapter_model.safetensors"))
    key = next(iter(saved))
    assert not torch.all(saved[key] == 0)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        save_adapter(model, tmp_path / "second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_load_adapter_rejects_non_adapter(tiny_llama: Any, tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError, match="not a PEFT adapter"):
        load_adapter(tiny_llama, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="cannot load the adapter"):
        load_adapter(tiny_llama, tmp_path)
