"""A tiny random-init LLaVA-NeXT (the architecture of PULSE-7B), built fully offline.

Tests and CPU smoke runs need a real `LlavaNextForConditionalGeneration` + `LlavaNextProcessor` that load
with `from_pretrained` like PULSE-7B does, without any hub download: the tokenizer is a byte-level BPE
trained here on a small built-in corpus, the towers are CLIP-vision + Llama configs a few layers deep.

    python training/tiny_llava.py OUT_DIR [--seed N]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script (`python training/tiny_llava.py OUT`): the checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from rag_ecg.io import atomic_dir
from training.chat_template import CHAT_TEMPLATE

IMAGE_SIZE = 56  # pixels of one crop (CLIP tower input)
PATCH_SIZE = 14  # ViT patch: 56 px -> 4x4 patches (+1 CLS)
GRID_PINPOINTS = [[56, 112], [112, 56], [112, 112]]  # any-resolution grids (height, width)
VOCAB_SIZE = 800  # BPE target; the corpus decides the final size
INIT_STD = 0.1  # text-tower init std: 0.02 leaves a random 64-wide lm_head too weak for LoRA to steer

# What the tokenizer learns from: ECG report vocabulary (English SCP-ECG statements, rhythm, morphology,
# German PTB-XL report words) plus chat and instruction words. Numbers and punctuation come from bytes.
_CORPUS = """
A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the human's questions. USER: ASSISTANT: SYSTEM:
What is the rhythm of this ECG? Is there evidence of myocardial infarction? Answer yes or no.
Which of the following diagnoses fits this electrocardiogram best? Options: A B C D E. The answer is
Please write a complete report for this 12-lead ECG image. Describe the rhythm, rate, axis and morphology.
Retrieved similar cases with their reports and labels, cited as [case 12]. Evidence: neighbours votes score.
sinus rhythm sinus tachycardia sinus bradycardia sinus arrhythmia atrial fibrillation atrial flutter
supraventricular tachycardia paced rhythm ventricular premature complex atrial premature complex
normal ECG abnormal ECG borderline normal rate heart rate beats per minute bpm regular irregular
myocardial infarction anterior inferior lateral septal anteroseptal anterolateral inferolateral
posterior subendocardial injury ischemia ST-T change ST elevation ST depression T wave inversion
T wave abnormality non-specific ischemic left ventricular hypertrophy right ventricular hypertrophy
left atrial enlargement right atrial overload hypertrophy conduction disturbance left bundle branch block
right bundle branch block incomplete complete left anterior fascicular block left posterior fascicular
first degree AV block second degree third degree Wolff-Parkinson-White syndrome prolonged QT interval
low QRS voltages high QRS voltage Q waves present left axis deviation right axis deviation normal axis
poor R wave progression in chest leads P wave QRS complex PR interval QT interval lead I II III aVR aVL
aVF V1 V2 V3 V4 V5 V6 limb leads precordial leads millivolt milliseconds seconds
NORM MI STTC CD HYP SR AFIB STACH SBRAD SARRH PACE LVH IRBBB CRBBB CLBBB LAFB 1AVB IMI ASMI NDT NST_
sinusrhythmus normales EKG lagetyp linkstyp rechtstyp steiltyp überdrehter t-veränderungen
periphere niedervoltage unvollständiger rechtsschenkelblock vorhofflimmern infarkt inferior anterior
linksventrikuläre hypertrophie pathologisch unbestätigter bericht bestätigt vermutlich möglich
yes no true false correct incorrect present absent likely unlikely the a an of in with and or is are
this that these patient male female age years old findings impression diagnosis conclusion
"""


def _corpus_lines() -> list[str]:
    lines = [ln.strip() for ln in _CORPUS.strip().splitlines() if ln.strip()]
    return lines * 4 + [ln.lower() for ln in lines] + [" ".join(str(i) for i in range(0, 300))]


def build_tokenizer():
    """Byte-level BPE (Llama/vicuna-like specials) wrapped as a PreTrainedTokenizerFast with `<image>`."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_corpus_lines(), trainer=trainer)
    bos_id = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                  padding_side="left", model_max_length=4096)
    return tok


def build_processor(tokenizer=None):
    """LlavaNextProcessor at 56 px with any-resolution grids and the vicuna chat template."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(),
                              patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, seed: int = 0):
    """LlavaNextForConditionalGeneration with a 2-layer CLIP vision tower and a 2-layer Llama, random init."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                       initializer_range=INIT_STD)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
                             image_grid_pinpoints=GRID_PINPOINTS, vision_feature_select_strategy="default",
                             vision_feature_layer=-2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def build_tiny_llava(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny LLaVA-NeXT model + processor to `out_dir` (replaced atomically); returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    model = build_model(processor.tokenizer, seed=seed)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description="Build a tiny random-init LLaVA-NeXT model + processor offline.")
    ap.add_argument("out_dir", type=Path, help="folder to write (from_pretrained-loadable)")
    ap.add_argument("--seed", type=int, default=0, help="weight-init seed")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return build_tiny_llava(args.out_dir, seed=args.seed)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
