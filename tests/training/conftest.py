"""Fixtures of the training-job tests: one torch thread for tiny models, and a job's INFO messages."""
from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny matmuls on shared cores: one intra-op thread is ~100x faster than two spin-waiting ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def info_messages(log_messages):
    """`lines = info_messages("training.finetune_llm")`: what that logger says from INFO up during the test
    (the messages a job reports as progress), whatever level the process's logging set-up left on it."""
    touched = []

    def collect(name: str) -> list[str]:
        logger = logging.getLogger(name)
        touched.append((logger, logger.level))
        logger.setLevel(logging.INFO)
        return log_messages(name)

    yield collect
    for logger, level in touched:
        logger.setLevel(level)
