"""PULSE conversion on a tiny checkpoint written in the original LLaVA-repo layout.

The tiny Hugging Face LLaVA-NeXT model is the ground truth: its weights are written under LLaVA-repo
names with a LLaVA-style config, converted back, and the result must give identical logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from training.chat_template import CHAT_TEMPLATE  # noqa: E402
from training.convert_pulse import (ConversionError, convert, convert_key, resize_rows,  # noqa: E402
                                    verify_loadable)
from tests.openai_server import tiny_llava_dir  # noqa: E402


def to_llava_key(hf_key: str) -> str:
    """transformers' in-memory LLaVA-NeXT name -> the LLaVA-repo name PULSE's checkpoint uses."""
    rules = [("model.language_model.", "model."), ("lm_head.", "lm_head."),
             ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
             ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
             ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
             ("model.image_newline", "model.image_newline")]
    for old, new in rules:
        if hf_key.startswith(old):
            return new + hf_key[len(old):]
    raise AssertionError(f"unmapped key {hf_key}")


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    folder = tiny_llava_dir()
    return folder, LlavaNextForConditionalGeneration.from_pretrained(folder).eval(), \
        LlavaNextProcessor.from_pretrained(folder)


def write_llava_checkpoint(tiny, dst: Path, with_vision: bool, fmt: str) -> Path:
    """The tiny model as haotian-liu/LLaVA saves a v1.6 model: renamed weights + mm_* config."""
    from transformers import CLIPImageProcessor

    folder, model, processor = tiny
    dst.mkdir(parents=True)
    sd = {to_llava_key(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints carry this buffer
    vision_dir = dst.parent / f"{dst.name}-clip"
    cfg = model.config
    cfg.vision_config.save_pretrained(vision_dir)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(vision_dir)
    if not with_vision:
        vis = {k.replace("model.vision_tower.vision_tower.", ""): sd.pop(k)
               for k in [k for k in sd if k.startswith("model.vision_tower.")]}
        save_file(vis, str(vision_dir / "model.safetensors"))
    keys = sorted(sd)
    if fmt == "safetensors":  # two shards, like a sharded hub checkpoint
        half = len(keys) // 2
        save_file({k: sd[k] for k in keys[:half]}, str(dst / "model-00001-of-00002.safetensors"))
        save_file({k: sd[k] for k in keys[half:]}, str(dst / "model-00002-of-00002.safetensors"))
    else:
        torch.save(sd, dst / "pytorch_model.bin")
    text = cfg.text_config.to_dict()
    llava_cfg = {k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                      "rms_norm_eps", "hidden_act", "bos_token_id", "eos_token_id",
                                      "vocab_size", "attention_bias")}
    llava_cfg.update({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "torch_dtype": "float32",
        "rope_theta": 10000.0, "tie_word_embeddings": False, "use_cache": True,
        "mm_vision_tower": str(vision_dir), "mm_hidden_size": cfg.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "image_grid_pinpoints": cfg.image_grid_pinpoints,
        "tokenizer_model_max_length": 4096, "unfreeze_mm_vision_tower": True,
    })
    (dst / "config.json").write_text(json.dumps(llava_cfg, indent=2))
    processor.tokenizer.save_pretrained(dst)
    return vision_dir


def _inputs(processor):
    img = Image.new("RGB", (150, 90), "white")
    img.paste((200, 30, 30), (10, 10, 80, 60))
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "sinus rhythm?"}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    return processor(images=img, text=prompt, return_tensors="pt")


@pytest.mark.parametrize("with_vision,fmt", [(True, "safetensors"), (False, "bin")])
def test_converted_model_gives_identical_logits(tiny, tmp_path, with_vision, fmt):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    _, source, src_proc = tiny
    src = tmp_path / "PULSE-tiny"
    vision_dir = write_llava_checkpoint(tiny, src, with_vision, fmt)
    out = convert(src, tmp_path / "pulse-tiny-hf", vision_tower=None if with_vision else vision_dir,
                  max_shard_gb=1e-4 if with_vision else 5.0)  # tiny shards: exercise the sharded index
    verify_loadable(out)
    manifest = json.loads((out / "conversion_manifest.json").read_text())
    assert manifest["image_token_index"] == source.config.image_token_index
    if with_vision:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in index["weight_map"]
        assert "language_model.model.layers.0.self_attn.q_proj.weight" in index["weight_map"]
    converted = LlavaNextForConditionalGeneration.from_pretrained(out).eval()
    proc = LlavaNextProcessor.from_pretrained(out)
    ref_in, new_in = _inputs(src_proc), _inputs(proc)
    assert torch.equal(ref_in["input_ids"], new_in["input_ids"])
    assert torch.equal(ref_in["pixel_values"], new_in["pixel_values"])
    with torch.no_grad():
        a = source(**ref_in).logits
        b = converted(**new_in).logits
    assert torch.equal(a, b)
    gen = converted.generate(**new_in, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == new_in["input_ids"].shape[1] + 4


def test_chat_template_is_llava_v1(tiny, tmp_path):
    from transformers import LlavaNextProcessor

    src = tmp_path / "src"
    write_llava_checkpoint(tiny, src, True, "safetensors")
    proc = LlavaNextProcessor.from_pretrained(convert(src, tmp_path / "out"))
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What rhythm?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Sinus rhythm."}]},
            {"role": "user", "content": "And the rate?"}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert text == ("A chat between a curious human and an artificial intelligence assistant. The assistant "
                    "gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
                    "What rhythm? ASSISTANT: Sinus rhythm.</s>USER: And the rate? ASSISTANT:")
    system = proc.apply_chat_template([{"role": "system", "content": "You read ECGs."},
                                       {"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                      tokenize=False)
    assert system == "You read ECGs. USER: Hi ASSISTANT:"
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_key_rules_and_errors(tiny, tmp_path):
    assert convert_key("model.layers.3.mlp.up_proj.weight") == "language_model.model.layers.3.mlp.up_proj.weight"
    assert convert_key("model.mm_projector.2.bias") == "multi_modal_projector.linear_2.bias"
    assert convert_key("model.vision_tower.vision_tower.vision_model.post_layernorm.weight") == \
        "vision_tower.vision_model.post_layernorm.weight"
    assert convert_key("model.image_newline") == "image_newline"
    assert convert_key("lm_head.weight") == "language_model.lm_head.weight"
    assert convert_key("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(ConversionError, match="unexpected weight name"):
        convert_key("transformer.h.0.attn.weight")
    grown = resize_rows(torch.arange(6.0).reshape(3, 2), 5)
    assert grown.shape == (5, 2) and torch.equal(grown[3], torch.tensor([2.0, 3.0]))

    src = tmp_path / "src"
    write_llava_checkpoint(tiny, src, False, "safetensors")
    with pytest.raises(ConversionError, match="no vision-tower weights"):
        _convert_without_local_tower(src, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "linear"}))
    with pytest.raises(ConversionError, match="mm_projector_type"):
        convert(src, tmp_path / "out2")
    with pytest.raises(ConversionError, match="already exists"):
        convert(src, src)


def _convert_without_local_tower(src: Path, tmp_path: Path):
    """Point mm_vision_tower at a config-only folder: weights absent everywhere must be a clear error."""
    import shutil

    cfg_only = tmp_path / "clip-config-only"
    shutil.copytree(src.parent / "src-clip", cfg_only, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "mm_vision_tower": str(cfg_only)}))
    return convert(src, tmp_path / "out", vision_tower=None)
