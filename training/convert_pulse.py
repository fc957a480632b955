"""Convert PULSE-7B from the original LLaVA repo layout to the Hugging Face LLaVA-NeXT layout.

PULSE-7B is published as a LLaVA-v1.6 (vicuna-7b) checkpoint of haotian-liu/LLaVA: `LlavaLlamaForCausalLM`
weights (`model.layers...`, `model.mm_projector.{0,2}`, `model.vision_tower.vision_tower.vision_model...`,
`model.image_newline`, `lm_head`) and a config.json with `mm_*` fields. vLLM and transformers load the
Hugging Face layout instead (`LlavaNextForConditionalGeneration`, as in llava-hf/llava-v1.6-vicuna-7b-hf).
This job renames the weights shard by shard (never the whole 7B in memory), adds the `<image>` token,
builds the LLaVA-NeXT config and processor with the vicuna ("llava_v1") chat template PULSE was trained
with, and writes safetensors plus a manifest, atomically. Renaming follows transformers'
`convert_llava_next_weights_to_hf.py`, written as explicit prefix rules.

    python training/convert_pulse.py /models/PULSE-7B /models/pulse-7b-hf [--vision-tower DIR] [--verify]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

if __name__ == "__main__":  # run as a script (`python training/convert_pulse.py`): the checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rag_ecg.errors import InputError
from rag_ecg.io import atomic_dir, publish, versions
from training.chat_template import CHAT_TEMPLATE

# LLaVA-repo name prefix -> Hugging Face LLaVA-NeXT prefix; the first matching rule wins.
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.mm_projector.0.", "multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "multi_modal_projector.linear_2."),
    ("model.image_newline", "image_newline"),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
SKIP_SUFFIXES = (".rotary_emb.inv_freq", "embeddings.position_ids")  # buffers, rebuilt at load time
EMBED_KEYS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")

# Vision towers LLaVA names by hub id, so a conversion needs no download (openai/clip-vit-large-patch14-336).
KNOWN_VISION_TOWERS: dict[str, dict] = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "openai/clip-vit-large-patch14": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
}


class ConversionError(InputError):
    """The source is not a convertible LLaVA-v1.6 checkpoint; the message says what is wrong."""


@dataclass
class ConvertConfig:
    """What to convert and how."""

    src: str  # PULSE-7B folder in the LLaVA layout: config.json, tokenizer files, *.safetensors or *.bin
    out: str  # output folder (Hugging Face LLaVA-NeXT layout), written atomically
    vision_tower: str | None = None  # local CLIP folder; needed if the checkpoint lacks the vision weights
    dtype: str = "keep"  # keep | bfloat16 | float16 | float32: dtype of the written weights
    pad_vocab_multiple: int = 64  # when tokens are added, round the vocab up to this (GPU-friendly)
    max_shard_gb: float = 5.0  # largest output safetensors shard
    overwrite: bool = False  # replace an existing output folder
    verify: bool = False  # load the result with transformers and check every weight was used


def convert_key(key: str) -> str | None:
    """LLaVA-repo weight name -> Hugging Face LLaVA-NeXT name; None for buffers that are not weights."""
    if key.endswith(SKIP_SUFFIXES):
        return None
    for old, new in KEY_RULES:
        if key == old or key.startswith(old):
            return new + key[len(old):]
    raise ConversionError(f"unexpected weight name {key!r}: not a LLaVA-v1.6 checkpoint?")


# ---------------------------------------------------------------- config


def read_llava_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.exists():
        raise ConversionError(f"{src}: no config.json (expected a LLaVA-repo checkpoint folder)")
    cfg = json.loads(path.read_text())
    mt = cfg.get("model_type", "")
    if mt not in ("llava_llama", "llava", "llava_mistral"):
        raise ConversionError(f"{path}: model_type {mt!r} is not a LLaVA-repo model (llava_llama expected; "
                              "already converted?)")
    checks = [
        (cfg.get("mm_projector_type", "linear") == "mlp2x_gelu",
         f"mm_projector_type {cfg.get('mm_projector_type')!r}: LLaVA-NeXT has a 2-layer GELU MLP projector"),
        (str(cfg.get("image_aspect_ratio", "")).startswith("anyres"),
         f"image_aspect_ratio {cfg.get('image_aspect_ratio')!r}: LLaVA-NeXT is any-resolution ('anyres')"),
        (cfg.get("mm_patch_merge_type", "flat").startswith("spatial_unpad"),
         f"mm_patch_merge_type {cfg.get('mm_patch_merge_type')!r}: LLaVA-NeXT unpads with image_newline "
         "('spatial_unpad')"),
        (not cfg.get("mm_use_im_start_end", False), "mm_use_im_start_end=true is not supported by LLaVA-NeXT"),
        (bool(cfg.get("image_grid_pinpoints")), "image_grid_pinpoints missing"),
        (bool(cfg.get("mm_vision_tower")), "mm_vision_tower missing"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConversionError(f"{path}: {msg}")
    return cfg


def vision_config_for(cfg: dict, vision_tower: Path | None):
    """CLIPVisionConfig + image-processor settings: from a local CLIP folder, or the known-tower table."""
    from transformers import CLIPVisionConfig

    name = cfg["mm_vision_tower"]
    folder = vision_tower or (Path(name) if Path(name).is_dir() else None)
    proc = {}
    if folder is not None:
        if not (folder / "config.json").exists():
            raise ConversionError(f"{folder}: vision tower folder has no config.json")
        vcfg = CLIPVisionConfig.from_pretrained(folder)
        pp = folder / "preprocessor_config.json"
        if pp.exists():
            d = json.loads(pp.read_text())
            proc = {k: d[k] for k in ("size", "crop_size", "image_mean", "image_std", "resample",
                                      "do_center_crop", "rescale_factor") if k in d}
    elif name in KNOWN_VISION_TOWERS:
        vcfg = CLIPVisionConfig(**KNOWN_VISION_TOWERS[name])
    else:
        raise ConversionError(f"vision tower {name!r} is neither a local folder nor a known tower: "
                              "pass --vision-tower /path/to/clip")
    if int(cfg.get("mm_hidden_size", vcfg.hidden_size)) != vcfg.hidden_size:
        raise ConversionError(f"mm_hidden_size {cfg['mm_hidden_size']} != vision hidden size {vcfg.hidden_size}")
    proc.setdefault("size", {"shortest_edge": vcfg.image_size})
    proc.setdefault("crop_size", {"height": vcfg.image_size, "width": vcfg.image_size})
    if isinstance(proc["size"], int):
        proc["size"] = {"shortest_edge": proc["size"]}
    if isinstance(proc["crop_size"], int):
        proc["crop_size"] = {"height": proc["crop_size"], "width": proc["crop_size"]}
    return vcfg, proc, folder


def text_config_for(cfg: dict, vocab_size: int, pad_token_id: int | None):
    from transformers import LlamaConfig, MistralConfig

    cls = MistralConfig if cfg["model_type"] == "llava_mistral" else LlamaConfig
    known = set(cls().to_dict()) | {"rope_theta", "rope_scaling"}  # legacy rope keys are still accepted
    d = {k: v for k, v in cfg.items() if k in known and not k.startswith("mm_") and v is not None
         and k not in ("architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype",
                       "dtype", "vocab_size", "pad_token_id", "tie_word_embeddings")}
    return cls(**d, vocab_size=vocab_size, pad_token_id=pad_token_id, tie_word_embeddings=False)


def build_config(cfg: dict, vcfg, vocab_size: int, image_token_id: int, pad_token_id: int | None, dtype: str):
    from transformers import LlavaNextConfig

    select = cfg.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConversionError(f"mm_vision_select_feature {select!r}: expected patch or cls_patch")
    config = LlavaNextConfig(
        text_config=text_config_for(cfg, vocab_size, pad_token_id), vision_config=vcfg,
        image_token_index=image_token_id, image_grid_pinpoints=[list(p) for p in cfg["image_grid_pinpoints"]],
        vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
        image_seq_length=(vcfg.image_size // vcfg.patch_size) ** 2,
    )
    config.pad_token_id = pad_token_id
    if dtype != "keep":
        config.dtype = dtype
    elif cfg.get("torch_dtype") or cfg.get("dtype"):
        config.dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    return config


# ---------------------------------------------------------------- tokenizer and processor


def load_tokenizer(src: Path):
    """The checkpoint's tokenizer with `<image>` (and a pad token) added when missing."""
    from transformers import AddedToken, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as exc:  # sentencepiece-only tokenizers need extra packages to convert
        raise ConversionError(f"{src}: cannot load the tokenizer ({str(exc).splitlines()[0][:200]}); a "
                              "tokenizer.model-only folder needs `pip install sentencepiece protobuf`") from None
    if "<image>" not in tok.get_vocab():
        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def build_processor(tokenizer, vcfg, proc_kwargs: dict, pinpoints, select_strategy: str):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    ip = LlavaNextImageProcessor(image_grid_pinpoints=[list(p) for p in pinpoints], **proc_kwargs)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=vcfg.patch_size,
                              vision_feature_select_strategy=select_strategy, num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE)


# ---------------------------------------------------------------- weights


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight shards: safetensors preferred, else PyTorch .bin files."""
    st = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter"))
    if st:
        return st
    return sorted(folder.glob("pytorch_model*.bin"))


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one shard, loading one shard at a time (safetensors lazily, .bin via mmap)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        yield from sd.items()


def shard_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    return [k for k, _ in iter_tensors(path)]


def resize_rows(t, rows: int):
    """Grow an embedding / lm_head matrix to `rows`; new rows are the mean of the old ones (deterministic)."""
    if t.shape[0] >= rows:
        return t
    extra = t.float().mean(dim=0, keepdim=True).expand(rows - t.shape[0], -1).to(t.dtype)
    return torch.cat([t, extra], dim=0)


class ShardWriter:
    """Accumulates renamed tensors and writes safetensors shards of at most `max_bytes` each."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.current: dict = {}
        self.current_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0
        self.seen: set[str] = set()

    def add(self, key: str, tensor) -> None:
        if key in self.seen:
            raise ConversionError(f"weight {key!r} appears twice in the checkpoint")
        self.seen.add(key)
        n = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + n > self.max_bytes:
            self._flush()
        self.current[key] = tensor.contiguous()
        self.current_bytes += n
        self.total += n

    def _flush(self) -> None:
        save_file(self.current, str(self.folder / f"part-{len(self.files):05d}.tmp"), metadata={"format": "pt"})
        self.files.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def close(self) -> None:
        if self.current:
            self._flush()
        n = len(self.files)
        if n == 1:
            publish(self.folder / "part-00000.tmp", self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, keys in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            publish(self.folder / f"part-{i:05d}.tmp", self.folder / name)
            weight_map.update({k: name for k in keys})
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


# ---------------------------------------------------------------- the job


def convert(src: str | Path, out: str | Path, vision_tower: str | Path | None = None, dtype: str = "keep",
            pad_vocab_multiple: int = 64, max_shard_gb: float = 5.0, overwrite: bool = False,
            verify: bool = False) -> Path:
    """Write the Hugging Face LLaVA-NeXT version of a LLaVA-v1.6 checkpoint to `out`; returns `out`."""
    from transformers import GenerationConfig

    src, out = Path(src).expanduser(), Path(out).expanduser()
    run = ConvertConfig(str(src), str(out), str(vision_tower) if vision_tower else None, dtype,
                        pad_vocab_multiple, max_shard_gb, overwrite, verify)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists (pass --overwrite to replace it)")
    if dtype not in ("keep", "bfloat16", "float16", "float32"):
        raise ConversionError(f"dtype {dtype!r}: expected keep, bfloat16, float16 or float32")
    cast = None if dtype == "keep" else getattr(torch, dtype)
    cfg = read_llava_config(src)
    vcfg, proc_kwargs, vision_dir = vision_config_for(cfg, Path(vision_tower) if vision_tower else None)
    files = weight_files(src)
    if not files:
        raise ConversionError(f"{src}: no *.safetensors or pytorch_model*.bin weight files")
    has_vision = any(k.startswith("model.vision_tower.") for f in files for k in shard_keys(f))
    vision_files: list[Path] = []
    if not has_vision:
        vision_files = weight_files(vision_dir) if vision_dir else []
        if not vision_files:
            raise ConversionError(f"{src}: the checkpoint holds no vision-tower weights; pass --vision-tower "
                                  f"with a local copy of {cfg['mm_vision_tower']} (config + weights)")

    tok = load_tokenizer(src)
    old_vocab = int(cfg["vocab_size"])
    vocab = old_vocab if len(tok) <= old_vocab else math.ceil(len(tok) / pad_vocab_multiple) * pad_vocab_multiple
    image_token_id = tok.convert_tokens_to_ids("<image>")
    config = build_config(cfg, vcfg, vocab, image_token_id, tok.pad_token_id, dtype)

    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, int(max_shard_gb * 2**30))
        for f in files:
            for key, t in iter_tensors(f):
                new = convert_key(key)
                if new is None:
                    continue
                if new in EMBED_KEYS:
                    t = resize_rows(t, vocab)
                writer.add(new, t.to(cast) if cast is not None else t)
        for f in vision_files:
            for key, t in iter_tensors(f):
                if key.startswith("vision_model.") and not key.endswith(SKIP_SUFFIXES):
                    writer.add("vision_tower." + key, t.to(cast) if cast is not None else t)
        missing = [k for k in EMBED_KEYS if k not in writer.seen]
        if missing or not any(k.startswith("vision_tower.") for k in writer.seen):
            raise ConversionError(f"{src}: incomplete checkpoint (missing {missing or 'vision tower weights'})")
        writer.close()
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, do_sample=False).save_pretrained(tmp)
        build_processor(tok, vcfg, proc_kwargs, cfg["image_grid_pinpoints"],
                        config.vision_feature_select_strategy).save_pretrained(tmp)
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        (tmp / "conversion_manifest.json").write_text(json.dumps({
            "job": "training/convert_pulse.py", "config": asdict(run), "source_model_type": cfg["model_type"],
            "source_vocab_size": old_vocab, "vocab_size": vocab, "image_token_index": image_token_id,
            "weights": len(writer.seen), "weight_bytes": writer.total, "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, indent=2))
        if verify:
            verify_loadable(tmp)
    return out


def verify_loadable(folder: str | Path) -> None:
    """Load with transformers and fail unless every weight matched and none was missing."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    _, info = LlavaNextForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise ConversionError(f"{folder}: converted weights do not load cleanly: {bad or info['error_msgs']}")
    AutoProcessor.from_pretrained(folder)


class _ArgParser(argparse.ArgumentParser):
    """A bad argument is a ConversionError (one line; exit 2 through `cli.py`), not argparse's usage block."""

    def error(self, message: str):
        raise ConversionError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    ap = _ArgParser(prog=prog, description="Convert a LLaVA-v1.6 (PULSE-7B) checkpoint to the Hugging Face "
                                           "LLaVA-NeXT layout served by vLLM.")
    ap.add_argument("src", help="PULSE-7B folder in the LLaVA repo layout")
    ap.add_argument("out", help="output folder (Hugging Face layout)")
    ap.add_argument("--vision-tower", default=None, help="local CLIP folder (config, preprocessor, weights)")
    ap.add_argument("--dtype", default="keep", choices=["keep", "bfloat16", "float16", "float32"])
    ap.add_argument("--pad-vocab-multiple", type=int, default=64)
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--verify", action="store_true", help="load the result with transformers (needs RAM for "
                                                          "the whole model)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return convert(a.src, a.out, a.vision_tower, a.dtype, a.pad_vocab_multiple, a.max_shard_gb, a.overwrite,
                   a.verify)


if __name__ == "__main__":
    try:
        print(main(sys.argv[1:]))
    except ConversionError as exc:
        print(f"convert_pulse: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
