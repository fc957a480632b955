"""The vicuna ("llava_v1") chat template PULSE-7B was trained with: one copy for the converted PULSE processor
and the tiny test model, so both format chats exactly as LLaVA did."""
from __future__ import annotations

VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# LLaVA "llava_v1" conversation: "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: ... ASSISTANT:".
# Content may be a string or a list of parts (vLLM sends either); images come first, as LLaVA trained.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content if part['type'] in ['image', 'image_url'] -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- if not loop.last %}{{ '\n' }}{% endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ render(messages[0]['content']) }}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{{ '" + VICUNA_SYSTEM.replace("'", "\\'") + "' }}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{ ' ' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' + render(message['content']) + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + render(message['content']) + '</s>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
