"""LoRA fine-tune of the tiny LLaVA-NeXT on conversations built from real PTB-XL cases.

Checks: loss only on answer tokens; the loss falls on a fixed batch; a run SIGKILLed right after its step-8
checkpoint, run again, resumes there and ends bit-identical to an uninterrupted one; adapter save -> reload
gives identical logits; the merged checkpoint loads with transformers and generates; QLoRA on a CPU device
fails with a clear message (on any host).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_thread")
from PIL import Image, ImageDraw  # noqa: E402

from training.common import setup_distributed  # noqa: E402
from training.finetune_config import load_config  # noqa: E402
from training.finetune_llm import main, train  # noqa: E402
from training.llm_data import (IGNORE_INDEX, ConversationDataset, Example, collate,  # noqa: E402
                               conversation_to_messages, tokenize_example)
from training.llm_model import (build_peft_model, load_base_model, load_processor, quiet_peft,  # noqa: E402
                                to_device, token_loss_sum)
from training.tiny_llava import build_tiny_llava  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY_CFG = REPO / "training" / "configs" / "lora_tiny_cpu.yaml"
N_CASES = 4


def _shared_data() -> Path:
    root = Path(os.environ.get("RAG_ECG_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not (root / "ptbxl" / "ptbxl_database.csv").exists():
        pytest.skip(f"real ECG data not found at {root} (set RAG_ECG_SHARED_DATA)")
    return root


def _draw(record, size=(168, 56)) -> Image.Image:
    """Lead II of a real record as a black trace on pink paper (small: the tiny model sees 56-px tiles)."""
    sig = record.lead("II")
    w, h = size
    img = Image.new("RGB", size, (255, 236, 236))
    d = ImageDraw.Draw(img)
    span = float(abs(sig).max()) or 1.0
    pts = [(x * w / len(sig), h / 2 - float(v) / span * (h / 2 - 2)) for x, v in enumerate(sig)]
    d.line(pts, fill=(0, 0, 0), width=1)
    return img


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A JSONL of 2-turn conversations about the first real PTB-XL records, images beside it."""
    from rag_ecg.data.records import ptbxl_record, read_ptbxl_index

    rows, _ = read_ptbxl_index(_shared_data() / "ptbxl")
    out = tmp_path_factory.mktemp("convs")
    (out / "images").mkdir()
    samples = []
    for row in rows[:N_CASES]:
        rec = ptbxl_record(row)
        _draw(rec).save(out / "images" / f"{row.ecg_id}.png")
        labels = ", ".join(rec.labels) or "none"
        samples.append({"id": f"ptbxl-{row.ecg_id}", "image": f"images/{row.ecg_id}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich diagnostic superclasses does this ECG show?"},
            {"from": "gpt", "value": labels},
            {"from": "human", "value": "Is the patient male or female?"},
            {"from": "gpt", "value": {"M": "male", "F": "female"}.get(rec.sex, "unknown")}]})
    (out / "train.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("model") / "tiny", seed=1)


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field (the one thing two identical runs may differ in)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def _cfg(tiny_dir, data_dir, out, **kw):
    ov = dict(model_path=str(tiny_dir), train_jsonl=str(data_dir / "train.jsonl"),
              val_jsonl=str(data_dir / "train.jsonl"), out_dir=str(out))
    ov.update(kw)
    return load_config(TINY_CFG, ov)


def test_labels_cover_answer_tokens_only(tiny_dir, data_dir):
    cfg = _cfg(tiny_dir, data_dir, data_dir / "unused")
    proc = load_processor(cfg)
    ds = ConversationDataset(cfg.train_jsonl, proc, cfg.max_length)
    ex = ds[0]
    assert isinstance(ex, Example), ex
    sample = ds.sample(0)
    ids, labels = ex.input_ids, ex.labels
    tok = proc.tokenizer
    img = ids == proc.image_token_id
    assert int(img.sum()) > 16 and bool((labels[img] == IGNORE_INDEX).all())  # image tokens never scored
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    scored = labels != IGNORE_INDEX
    assert bool((labels[scored] == ids[scored]).all())
    # the scored tokens are exactly the two answers with their end-of-turn tokens, in order
    answers = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
    assert tok.decode(ids[scored]) == "".join(f" {a}</s>" for a in answers)
    # everything else (system prompt, USER/ASSISTANT tags, questions) is masked
    full = tok.decode(ids[~img])
    assert "Which diagnostic superclasses" in full and "ASSISTANT:" in full
    assert "Which" not in tok.decode(ids[scored]) and "ASSISTANT" not in tok.decode(ids[scored])
    # the processor's own rendering of the same chat gives the same tokens (training == inference format)
    msgs = conversation_to_messages(sample)
    text = proc.apply_chat_template(msgs, tokenize=False)
    ref = proc(images=[ds.load_image(sample["image"])], text=[text], return_tensors="pt")["input_ids"][0]
    assert torch.equal(ref, ids)

    last_img, first_answer = int(img.nonzero().max()), int(scored.nonzero().min())
    image = ds.load_image(sample["image"])
    short = tokenize_example(proc, sample, image, max_length=first_answer + 2)  # text cut at the end
    assert torch.equal(short.input_ids, ids[: first_answer + 2])
    assert torch.equal(short.labels, labels[: first_answer + 2])
    with pytest.raises(ValueError, match="no answer token fits"):  # nothing left to learn from
        tokenize_example(proc, sample, image, max_length=first_answer)
    with pytest.raises(ValueError, match="image \\+ prompt need"):  # never cut through the image tokens
        tokenize_example(proc, sample, image, max_length=last_img)


def test_collate_pads_tokens_and_patches(tiny_dir, data_dir):
    cfg = _cfg(tiny_dir, data_dir, data_dir / "unused")
    proc = load_processor(cfg)
    ds = ConversationDataset(cfg.train_jsonl, proc, cfg.max_length)
    batch = collate([ds[0], ds[1], ("bad", "image not found")], proc.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[:1] == (2,)
    assert batch["pixel_values"].shape[-3:] == (3, 56, 56) and batch["image_sizes"].shape == (2, 2)
    assert batch["skipped"] == [("bad", "image not found")]
    pad = batch["attention_mask"] == 0
    assert bool((batch["labels"][pad] == IGNORE_INDEX).all())


def test_finetune_loss_falls_resumes_exactly_and_merges(tiny_dir, data_dir, tmp_path, info_messages):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    # 4 samples, batch 2 x accumulation 2: every optimizer step sees the same fixed batch
    def overrides(out: Path) -> list[str]:
        return [f"model_path={tiny_dir}", f"train_jsonl={data_dir / 'train.jsonl'}",
                f"val_jsonl={data_dir / 'train.jsonl'}", f"out_dir={out}",
                "lora_dropout=0.1", "max_steps=16", "save_every=8", "eval_every=8"]

    run = main(TINY_CFG, overrides(tmp_path / "run"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == 16 and losses[-1] < 0.6 * losses[0], losses
    assert len(vals) == 2 and vals[-1] < vals[0]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["steps"] == 16 and manifest["train_samples"] == N_CASES and not manifest["skipped_samples"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000008", "step-000016"]

    # the same run as a script, SIGKILLed once its step-8 checkpoint is published (a fixed point in the run,
    # RAG_ECG_KILL_AT), then run again: it resumes at step 8 and ends bit-identical, weights and metrics
    cut = tmp_path / "cut"
    killed = subprocess.run([sys.executable, str(REPO / "training" / "finetune_llm.py"), "--config", str(TINY_CFG),
                             *overrides(cut)], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "RAG_ECG_KILL_AT": "llm-checkpoint"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "step 8/16" in killed.stderr and "step 9/16" not in killed.stderr, killed.stderr[-2000:]
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-000008"]
    assert not (cut / "adapter").exists() and not (cut / "manifest.json").exists()
    before = _metrics(cut)  # steps 1-8 and the step-8 evaluation, as the uninterrupted run logged them
    assert before == _metrics(run)[: len(before)] and before[-1] == {"step": 8, "val_loss": vals[0]}
    logs = info_messages("training.finetune_llm")
    main(TINY_CFG, overrides(cut))
    assert any("resumed from" in m and "step-000008 at step 8/16" in m for m in logs), logs
    a = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("multi_modal_projector" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(cut) == _metrics(run)  # every step's loss, lr and token count, both evaluations
    assert json.loads((cut / "manifest.json").read_text())["steps"] == 16

    # a checkpoint from a different setup is refused, not silently mixed in
    with pytest.raises(ValueError, match="lora_r"):
        train(_cfg(tiny_dir, data_dir, cut, lora_r=4, max_steps=20))

    # adapter on the base vs merged checkpoint: same logits; merged loads with transformers and generates
    proc = LlavaNextProcessor.from_pretrained(run / "merged")
    merged = LlavaNextForConditionalGeneration.from_pretrained(run / "merged").eval()
    base = LlavaNextForConditionalGeneration.from_pretrained(tiny_dir)
    with quiet_peft():
        adapted = PeftModel.from_pretrained(base, run / "adapter").eval()
    ds = ConversationDataset(data_dir / "train.jsonl", proc, 1024)
    s = ds.sample(2)
    msgs = conversation_to_messages(s)[:1]
    inputs = proc(images=[ds.load_image(s["image"])], text=[proc.apply_chat_template(msgs, add_generation_prompt=True)],
                  return_tensors="pt")
    with torch.no_grad():
        lm, la = merged(**inputs).logits, adapted(**inputs).logits
        fresh = LlavaNextForConditionalGeneration.from_pretrained(tiny_dir).eval()(**inputs).logits
        out = merged.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.allclose(lm, la, atol=1e-4)
    assert not torch.allclose(lm, fresh, atol=1e-3)  # the fine-tune changed the model
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_adapter_save_reload_identical_logits(tiny_dir, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import LlavaNextForConditionalGeneration

    cfg = _cfg(tiny_dir, data_dir, tmp_path, lora_r=4, lora_alpha=8)
    dist = setup_distributed("cpu")
    proc = load_processor(cfg)
    model = build_peft_model(cfg, load_base_model(cfg, dist))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("vision_tower" in n for n in trainable)
    assert all("language_model" in n or "multi_modal_projector" in n for n in trainable)
    ds = ConversationDataset(cfg.train_jsonl, proc, cfg.max_length)
    batch = to_device(collate([ds[0], ds[3]], proc.tokenizer.pad_token_id), dist.device, torch.float32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # move the adapter away from its zero init so the check means something
        loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    with torch.no_grad():
        before = model(**inputs).logits
        base = LlavaNextForConditionalGeneration.from_pretrained(tiny_dir)
        with quiet_peft():
            after = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(**inputs).logits
    assert torch.equal(before, after)


def test_config_errors_are_one_clear_line(tiny_dir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown FinetuneConfig field"):
        _cfg(tiny_dir, data_dir, tmp_path, lora_rank=8)
    with pytest.raises(ValueError, match="model_path: not set"):
        load_config(REPO / "training" / "configs" / "lora_pulse7b.yaml")
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_config(REPO / "training" / "configs" / "lora_pulse7b.yaml", {"model_path": str(tmp_path / "x")})
    pulse = load_config(REPO / "training" / "configs" / "lora_pulse7b.yaml",
                           [f"model_path={tiny_dir}", f"train_jsonl={data_dir / 'train.jsonl'}", "val_jsonl=null"])
    assert pulse.dtype == "bf16" and pulse.lora_r in (64, 128) and pulse.max_length >= 2048
    assert 2e-5 <= pulse.learning_rate <= 2e-4 and pulse.per_device_batch_size * pulse.grad_accum == 128
    # QLoRA on a CPU device: refused in one line on any host (a GPU host included: device is what counts)
    cfg = _cfg(tiny_dir, data_dir, tmp_path, quantization="4bit")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU \\(bitsandbytes\\), the run's device is cpu"):
        load_base_model(cfg, setup_distributed("cpu"))


class _RunsCode:
    """What a crafted checkpoint would hold: unpickling it (weights_only=False) runs code (touches a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pruning_keeps_the_newest_and_a_crafted_rng_pickle_is_refused(tiny_dir, data_dir, tmp_path):
    from rag_ecg.errors import ArtifactError
    from training.llm_checkpoint import verify_checkpoint

    over = dict(lora_dropout=0.0, max_steps=4, save_every=2, eval_every=0, save_total_limit=1)
    train(_cfg(tiny_dir, data_dir, tmp_path / "run", **over))
    cks = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in cks.iterdir()) == ["step-000004"]  # step 2 went once step 4 loaded back
    verify_checkpoint(cks / "step-000004", 1)

    # the RNG file replaced by a pickle that runs code when loaded the unsafe way
    marker = tmp_path / "pwned"
    rng = cks / "step-000004" / "rng-rank0.pt"
    torch.save(_RunsCode(marker), rng)
    shutil.copy(rng, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)  # the crafted file is real: loading it unsafely runs it
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ArtifactError) as err:  # resume: refused in one line naming the file, nothing run
        train(_cfg(tiny_dir, data_dir, tmp_path / "run", **{**over, "max_steps": 6}))
    assert str(err.value).startswith(f"{rng}: refused, not a plain-data checkpoint file (")
    assert "\n" not in str(err.value) and not marker.exists()
    with pytest.raises(ArtifactError, match="rng-rank0.pt: refused"):
        verify_checkpoint(cks / "step-000004", 1)
    assert not marker.exists()

    (cks / "step-000004" / "adapter_model.safetensors").write_bytes(b"\0" * 16)  # a torn adapter file
    with pytest.raises(ArtifactError, match=r"step-000004: checkpoint does not load back \("):
        verify_checkpoint(cks / "step-000004", 1)
