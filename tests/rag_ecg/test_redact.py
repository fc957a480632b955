"""Secrets out of what rag-ecg writes or prints: passwords in URLs and secret-named settings are masked."""
from __future__ import annotations

from rag_ecg.redact import mask_url, redact


def test_mask_url_hides_passwords_of_database_and_http_urls():
    assert mask_url("postgresql+psycopg://ecg:s3cret@db.host:5432/cases") == \
        "postgresql+psycopg://ecg:***@db.host:5432/cases"
    assert mask_url("http://alice:s3cret@10.0.0.2:8000/v1") == "http://alice:***@10.0.0.2:8000/v1"
    assert mask_url("https://tok3n@host/v1?api_key=s3cret&x=1") == "https://***@host/v1?api_key=***&x=1"
    for plain in ("sqlite:////tmp/a.db", "http://127.0.0.1:8000/v1", "not a url", ""):
        assert mask_url(plain) == plain


def test_redact_masks_secret_settings_at_any_depth_and_leaves_the_rest():
    opts = {"review": {"backend_options": {"api_key": "sk-1", "base_url": "http://u:pw@h/v1", "model": "m",
                                           "max_tokens": 64, "hf_token": "hf_x", "password": None}},
            "key": "job-hash", "db": "postgresql://u:pw@h/db", "list": [{"secret": "x"}, "http://h/v1"]}
    out = redact(opts)
    assert out == {"review": {"backend_options": {"api_key": "***", "base_url": "http://u:***@h/v1", "model": "m",
                                                  "max_tokens": 64, "hf_token": "***", "password": None}},
                   "key": "job-hash", "db": "postgresql://u:***@h/db", "list": [{"secret": "***"}, "http://h/v1"]}
    assert opts["review"]["backend_options"]["api_key"] == "sk-1"  # a copy: the caller's settings still work
