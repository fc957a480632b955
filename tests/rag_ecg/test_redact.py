"""Secrets out of what rag-ecg writes or prints: passwords in URLs and secret-named settings are masked."""
from __future__ import annotations

from rag_ecg.redact import is_masked, mask_url, redact


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


def test_database_urls_lose_query_passwords_too_and_urls_without_secrets_are_kept_as_given():
    """libpq takes `?password=`: masked like the user-info one. A URL with nothing to hide comes back as the
    very string given (a re-rendered SQLite path would be quoted: a saved config would name another file)."""
    assert mask_url("postgresql://db.host/cases?password=s3cret&sslmode=require") == \
        "postgresql://db.host/cases?password=***&sslmode=require"
    for plain in ("sqlite:////data/ä ö/cases.db", "sqlite:////tmp/%41.db", "postgresql://u@h/db?sslmode=require"):
        assert mask_url(plain) == plain


def test_is_masked_tells_a_saved_masked_url_from_one_that_connects():
    secret = ["postgresql+psycopg2://ecg:s3cret@db.host/cases", "postgresql://h/db?password=pw",
              "http://alice:pw@h/v1", "https://tok3n@h/v1", "https://h/v1?api_key=sk-1"]
    for url in secret:
        assert not is_masked(url) and is_masked(mask_url(url)), url
    for other in ("sqlite:////tmp/***.db", "http://h/v1?q=***", "postgresql://u@h/db", "***", None, 3):
        assert not is_masked(other), other
