"""The serving scripts, run for real where no GPU is needed: serve_pulse.sh's vLLM command line (a stand-in
`vllm` executable prints what it was given) and gpu_check.sh's first step failing with one clear line."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")


def _fake_model(tmp_path: Path) -> Path:
    model = tmp_path / "pulse-7b-hf"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlavaNextForConditionalGeneration"]}')
    (model / "chat_template.jinja").write_text("{{ messages }}")
    return model


def _fake_vllm(tmp_path: Path) -> Path:
    exe = tmp_path / "vllm"
    exe.write_text('#!/bin/sh\necho "$@"\n')
    exe.chmod(0o755)
    return exe


def test_serve_pulse_serves_the_window_and_a_lora_adapter(tmp_path):
    model, exe = _fake_model(tmp_path), _fake_vllm(tmp_path)
    lora = tmp_path / "adapter"
    lora.mkdir()
    env = {**os.environ, "VLLM": str(exe), "LORA": str(lora), "PORT": "9123"}
    res = subprocess.run([BASH, str(ROOT / "training/serve_pulse.sh"), str(model), "--enforce-eager"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "has no adapter_config.json" in res.stderr  # not an adapter folder
    (lora / "adapter_config.json").write_text("{}")
    res = subprocess.run([BASH, str(ROOT / "training/serve_pulse.sh"), str(model), "--enforce-eager"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    args = res.stdout.split()
    assert args[:2] == ["serve", str(model)] and args[-1] == "--enforce-eager"
    assert " ".join(args[args.index("--max-model-len"):][:2]) == "--max-model-len 4096"
    assert f"--enable-lora --max-lora-rank 64 --lora-modules pulse-7b-lora={lora}" in res.stdout
    assert "--port 9123" in res.stdout and "vllm-project/vllm#49788" in res.stderr


def test_gpu_check_parses_and_stops_at_its_first_step_without_a_gpu(tmp_path):
    script = ROOT / "bench/gpu_check.sh"
    assert subprocess.run([BASH, "-n", str(script)], capture_output=True, timeout=30).returncode == 0
    bin_dir = tmp_path / "bin"  # the tools the script needs before its GPU check, and no nvidia-smi
    bin_dir.mkdir()
    for tool in ("dirname", "mkdir", "tail"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    res = subprocess.run([BASH, str(script)], env={"PATH": str(bin_dir), "WORK": str(tmp_path / "work")},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.splitlines()[-1] == ("gpu_check: FAILED preflight: nvidia-smi not found: this check needs an "
                                           f"NVIDIA GPU (log: {tmp_path / 'work' / 'logs' / 'preflight.log'})")
