"""In-process LLaVA-NeXT reader (PULSE-7B converted to the Hugging Face layout, or any LLaVA-NeXT folder).

For a single machine without a vLLM server: transformers loads the model from a local folder and
generates greedily by default. transformers is imported in the constructor; `backends.get_backend` imports
this module only when the hf backend is chosen, so torch is never loaded for the other readers.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from rag_ecg.errors import BackendError
from rag_ecg.reader.base import LLMBackend
from rag_ecg.reader.messages import chat_messages
from rag_ecg.reader.token_budget import PromptTooLongError


@dataclass
class HFConfig:
    """Settings of the in-process transformers reader."""

    model_path: str  # local folder with config.json, weights and processor (no hub downloads)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    max_new_tokens: int = 1024  # answer length cap (CoT text + JSON)
    do_sample: bool = False  # greedy by default: the same image and evidence give the same report
    temperature: float = 0.7  # only used when do_sample
    top_p: float = 0.9  # only used when do_sample
    window_tokens: int | None = None  # context window (None: the model's max_position_embeddings)
    min_answer_tokens: int = 400  # cases are dropped until the window leaves at least this for the answer


class HFBackend(LLMBackend):
    """transformers LlavaNextForConditionalGeneration + its processor, on CPU or GPU."""

    name = "hf"

    def __init__(self, model_path: str | Path, device: str = "auto", dtype: str = "auto",
                 max_new_tokens: int = 1024, do_sample: bool = False, temperature: float = 0.7,
                 top_p: float = 0.9, window_tokens: int | None = None, min_answer_tokens: int = 400):
        try:
            from transformers import AutoProcessor, LlavaNextForConditionalGeneration
        except ImportError as exc:
            raise BackendError(f"the hf backend needs torch and transformers ({exc.name} is missing): "
                               "install the project's dependencies (pip install -e .)") from None
        path = Path(model_path).expanduser()
        if not (path / "config.json").exists():
            raise BackendError(f"{path}: not a Hugging Face model folder (no config.json); convert PULSE-7B "
                               "with `python training/convert_pulse.py` first")
        self.config = HFConfig(str(path), device, dtype, max_new_tokens, do_sample, temperature, top_p,
                               window_tokens, min_answer_tokens)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        else:
            torch_dtype = getattr(torch, dtype, None)
            if not isinstance(torch_dtype, torch.dtype):
                raise BackendError(f"hf backend dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
        try:
            self.processor = AutoProcessor.from_pretrained(path)
            self.hf_model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).to(device)
        except (OSError, ValueError) as exc:
            raise BackendError(f"{path}: cannot load a LLaVA-NeXT model and processor "
                               f"({str(exc).splitlines()[0][:200]})") from None
        if not getattr(self.processor, "chat_template", None):
            raise BackendError(f"{path}: the processor has no chat template (convert with "
                               "training/convert_pulse.py, which writes one)")
        self.hf_model.eval()
        self.device = device
        self.model = path.name
        self._lock = threading.Lock()  # one generate at a time: the model is not re-entrant

    def prompt_text(self, messages: Sequence[Any], images: Sequence = ()) -> tuple[str, list]:
        """The exact prompt string the model sees (chat template applied) and the images in order."""
        conv, imgs = chat_messages(messages, images)
        return self.processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False), imgs

    @property
    def window(self) -> int | None:
        """The model's context window in tokens (prompt + answer)."""
        if self.config.window_tokens:
            return int(self.config.window_tokens)
        cfg = getattr(self.hf_model.config, "text_config", None) or self.hf_model.config
        n = getattr(cfg, "max_position_embeddings", None)
        return int(n) if n else None

    def count(self, messages: Sequence[Any], images: Sequence = ()) -> tuple[int, str]:
        """The prompt's tokens as the model will see them (the processor expands each picture's tokens)."""
        prompt, imgs = self.prompt_text(messages, images)
        ids = self.processor(images=imgs or None, text=prompt)["input_ids"][0]
        return len(ids), "counted by the model's processor"

    @property
    def min_answer(self) -> int:
        """Tokens the window must leave for the answer (`prepare` drops cases until it does)."""
        return min(self.config.min_answer_tokens, self.config.max_new_tokens)

    def generate(self, messages: Sequence[Any], images: Sequence = ()) -> str:
        prompt, imgs = self.prompt_text(messages, images)
        inputs = self.processor(images=imgs or None, text=prompt, return_tensors="pt").to(self.device)
        used, window = int(inputs["input_ids"].shape[1]), self.window
        if window is not None and window - used < 1:
            raise PromptTooLongError(f"the prompt needs {used:,} tokens, the model's window is {window:,}")
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.hf_model.dtype)
        tok = self.processor.tokenizer
        room = self.config.max_new_tokens if window is None else min(self.config.max_new_tokens, window - used)
        kwargs = dict(max_new_tokens=room, do_sample=self.config.do_sample,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        if self.config.do_sample:
            kwargs.update(temperature=self.config.temperature, top_p=self.config.top_p)
        with self._lock, torch.inference_mode():
            out = self.hf_model.generate(**inputs, **kwargs)
        new = out[0, inputs["input_ids"].shape[1]:]
        return tok.decode(new, skip_special_tokens=True).strip()

    def close(self) -> None:
        self.hf_model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
