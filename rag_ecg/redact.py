"""Secrets out of everything rag-ecg writes or prints: `mask_url` and `redact`.

Why one place: settings travel into shareable files (a review's manifest.json, eval.json, error lines in
results.csv) and into messages; an API key or a password inside a store / server URL must never go with them.
Database URLs are rendered by SQLAlchemy with the password (and secret-named query values, libpq's
`?password=`) hidden, and left as given when there is nothing to hide; http(s) URLs lose the password of their
user info (a bare user info may itself be a token: it is hidden whole) and the values of secret-named query
parameters. `redact` returns a copy of nested settings with secret-named keys masked and URLs masked;
`is_masked` tells a masked URL read back (from a run's saved config) from one that can connect.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

MASK = "***"
_WEB = ("http", "https", "ws", "wss")
# whole key, or its last `_`/`-` part(s): api_key, hf_token, client_secret, db_password ... (not max_tokens)
_SECRET_KEY = re.compile(r"(?:.*[_-])?(?:api_?key|access_?key|secret(?:_?key)?|passw(?:or)?d|pwd|token|"
                         r"credentials?|authorization|auth)", re.I)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*://)(?P<user>[^/@:?#]*)(?::[^/@?#]*)?@")


def is_secret_key(key: str) -> bool:
    """Whether a setting of this name holds a secret (api_key, token, password, ...)."""
    return bool(_SECRET_KEY.fullmatch(str(key)))


def mask_url(url: str) -> str:
    """`url` with its password (and secret query values) replaced by ***; anything else unchanged."""
    if not isinstance(url, str) or "://" not in url:
        return url
    scheme = url.split("://", 1)[0].lower()
    if scheme in _WEB:
        return _mask_web(url)
    try:
        u = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", url)
    secret_query = {k: MASK for k in u.query if is_secret_key(k)}  # e.g. libpq's ?password=
    if u.password is None and not secret_query:
        return url  # nothing to hide: the URL as given (a re-rendered one may quote its path differently)
    return u.update_query_dict(secret_query).render_as_string(hide_password=True).replace("%2A%2A%2A", MASK)


def is_masked(url: Any) -> bool:
    """Whether `url` is one `mask_url` masked (a saved config read back): its password or key is gone, so it
    cannot connect, and the real one must come from elsewhere (the command line, the environment)."""
    if not isinstance(url, str) or "://" not in url or MASK not in url:
        return False
    if url.split("://", 1)[0].lower() in _WEB:
        try:
            p = urlsplit(url)
            pairs = parse_qsl(p.query, keep_blank_values=True)
        except ValueError:
            return False
        userinfo = p.netloc.rpartition("@")[0]
        return MASK in userinfo.split(":") or any(is_secret_key(k) and v == MASK for k, v in pairs)
    try:
        u = make_url(url)
        return u.password == MASK or any(is_secret_key(k) and MASK in ((v,) if isinstance(v, str) else v)
                                         for k, v in u.query.items())
    except (ArgumentError, ValueError, TypeError):
        m = _USERINFO.match(url)
        return bool(m) and m.group(0).endswith(f":{MASK}@")


def _mask_web(url: str) -> str:
    try:
        p = urlsplit(url)
    except ValueError:
        return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", url)
    netloc = p.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{host}" if ":" in userinfo else f"{MASK}@{host}"
    query = p.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_key(k) for k, _ in pairs):
            query = urlencode([(k, MASK if is_secret_key(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((p.scheme, netloc, p.path, query, p.fragment))


def redact(obj: Any) -> Any:
    """A copy of nested settings (dicts, lists, strings) with secret-named values -> *** and URLs masked."""
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return mask_url(obj)
    return obj
