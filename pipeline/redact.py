"""Secrets kept out of everything a run records or prints.

What is redacted:
- credentials in any URL (`http://user:secret@host:5000` -> `http://host:5000`): the
  tracking URI as a param, in `config.yaml`, in tags, log lines and error messages, and
  git remotes;
- the value of any config key or override whose key looks like a secret (`*password*`,
  `*token*`, `*secret*`, `*key*`, e.g. `+aws.secret_access_key=...` -> `...=***`) in
  params, `config.yaml` and the `command` and `overrides` tags. A run recorded so
  cannot be reproduced with that secret (`reproduce=` trains `***`): keep secrets in the
  environment, not the config.

What is not: what other programs write
(Hydra's own `.hydra/overrides.yaml` in the job's output directory keeps the command
line as typed; MLflow keeps `MLFLOW_TRACKING_PASSWORD` in the environment only).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

# scheme://user[:password]@ -- the userinfo part of a URL, wherever it appears in a text.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@")
_SECRET_KEY = re.compile(r"password|passwd|token|secret|key", re.IGNORECASE)
# Keys of `conf/` that say "key" and are not secrets: which dataset features are the inputs and labels.
_NOT_SECRET = re.compile(r"(?:^|\.)(?:image|label)_key$")
MASK = "***"


def is_secret_key(key: str) -> bool:
    """Whether a config key or override's key looks like it holds a secret."""
    key = key.lstrip("+~")
    return bool(_SECRET_KEY.search(key)) and not _NOT_SECRET.search(key)


def strip_credentials(url: str) -> str:
    """`https://user:token@host/repo.git` -> `https://host/repo.git`; other forms as given
    (`git@host:repo.git` names a user, not a secret)."""
    return split_credentials(url)[0]


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """`http://user:pass@host:5000` -> (`http://host:5000`, `user`, `pass`), unquoted;
    a URL without credentials -> (url, None, None)."""
    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url, None, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(user), unquote(password)


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it removed."""
    return _USERINFO.sub(r"\g<scheme>", text)


def redact_override(override: str) -> str:
    """`+db.password=hunter2` -> `+db.password=***`; a URL's credentials go either way."""
    key, sep, value = override.partition("=")
    if sep and is_secret_key(key):
        return f"{key}={MASK}"
    return redact(override)


def redact_command(arguments: Iterable[str]) -> list[str]:
    """Command-line arguments with secret-looking override values and URL credentials masked."""
    return [redact_override(argument) for argument in arguments]


def redact_config(container: Any) -> Any:
    """A plain (resolved) config container for params and `config.yaml`: URL credentials
    removed from every string, and the value of every secret-looking key masked (no key
    of `conf/` is taken for one: only keys a user adds, e.g. `+db.password=...`)."""
    if isinstance(container, dict):
        return {key: MASK if is_secret_key(str(key)) and not isinstance(value, (dict, list))
                else redact_config(value) for key, value in container.items()}
    if isinstance(container, list):
        return [redact_config(value) for value in container]
    return redact(container) if isinstance(container, str) else container
