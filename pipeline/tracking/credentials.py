"""Credentials in a tracking URI never reach a file, a log line or an MLflow param.

    uri = take_credentials("https://alice:tok3n@mlflow.example.org")   # "https://mlflow.example.org"
    redact("https://alice:tok3n@host")                                 # "https://***@host"

A URI of the form `scheme://user:password@host/...` (tracking.uri or MLFLOW_TRACKING_URI) is
split: the credentials go to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in this
process's environment (MLflow's client sends them as HTTP basic auth; child processes and
Slurm jobs started from here inherit them), and rdpt keeps and writes only the bare URI.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

USER_VAR, PASSWORD_VAR = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def has_credentials(uri: str | None) -> bool:
    return bool(uri) and "@" in (urlsplit(uri).netloc or "")


def bare(uri: str) -> str:
    """`uri` without its user:password@ part."""
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def redact(uri: str | None) -> str | None:
    """`uri` with its credentials replaced by *** (for messages)."""
    if not has_credentials(uri):
        return uri
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, "***@" + host, parts.path, parts.query, parts.fragment))


def take_credentials(uri: str | None) -> str | None:
    """Move the credentials of `uri` into MLflow's environment variables; return the bare URI."""
    if not has_credentials(uri):
        return uri
    parts = urlsplit(uri)
    userinfo = parts.netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    if user:
        os.environ[USER_VAR] = user
    if password:
        os.environ[PASSWORD_VAR] = password
    return bare(uri)
