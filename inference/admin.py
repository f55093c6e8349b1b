"""The operator's commands beside the daemon: ``inference keys add TENANT`` (a new key, printed once, its hash
written to the tenants' key file) and ``inference usage`` (the usage ledger, read from its store)."""

from __future__ import annotations

import importlib
import os
import secrets
import tempfile
import time
from collections.abc import Sequence
from typing import Any, TextIO

import yaml

from .config import ConfigError
from .tenants import key_hash, key_id, parse_tenants
from .usage import SUMS, connect_args, iso, summary_rows, summary_sql, where_store

KEY_PREFIX = "sk-inf-"


def add_key(path: str, tenant: str, out: TextIO, err: TextIO) -> None:
    """Make a key for ``tenant`` (added to the file when new, with no limit), write its hash to ``path`` and
    print the key, the one time it is shown; :class:`ConfigError` when the file cannot take it."""
    data = _tenants_file(path)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    hashed = key_hash(key.encode("utf-8"))
    entries: list[dict[str, Any]] = data.setdefault("tenants", [])
    entry = next((e for e in entries if isinstance(e, dict) and e.get("name") == tenant), None)
    if entry is None:
        entry = {"name": tenant, "keys": []}
        entries.append(entry)
    entry.setdefault("keys", []).append(hashed)
    parse_tenants(data, path)  # what is written must load (the tenant's name, the rest of the file)
    _write(path, yaml.safe_dump(data, sort_keys=False, width=120))
    print(key, file=out)
    print(f"added {key_id(hashed)} to tenant '{tenant}' in {path}; the key above is shown only now. The daemon "
          "reads the file again on SIGHUP (systemctl reload inference).", file=err)


def _tenants_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return {"tenants": []}
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    if not text.strip():
        return {"tenants": []}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if not isinstance(data, dict) or "tenants" not in data:
        raise ConfigError(f"{path} holds plain keys, one per line: keys add writes a tenants file (see the README's "
                          "'Sharing a fleet'); give it another --file, or move these keys' tenant there first")
    return data


def _write(path: str, text: str) -> None:
    """Replace ``path`` at once (never half written), readable by its owner alone, as a key file should be."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".keys-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write("# Tenants and their key hashes (inference keys add TENANT). Never a key itself.\n" + text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def usage_report(store: str, since: float, group_by: Sequence[str], out: TextIO) -> None:
    """Calls, errors and tokens per group since ``since``, as a table (the CLI may block: it is not the daemon)."""
    dialect, args, kwargs = connect_args(store)
    try:
        connection = importlib.import_module(dialect.driver).connect(*args, **kwargs)
    except Exception as e:  # the driver's own errors: one line, no password
        raise ConfigError(f"cannot open the usage store {where_store(store)}: {str(e).splitlines()[0]}") from None
    try:
        cursor = connection.cursor()
        cursor.execute(summary_sql(dialect, group_by), (since, time.time() + 1))
        rows = summary_rows(group_by, cursor.fetchall())
    except Exception as e:
        raise ConfigError(f"cannot read the usage store {where_store(store)}: {str(e).splitlines()[0]}") from None
    finally:
        connection.close()
    header = [*group_by, *SUMS]
    table = [header] + [["-" if row[name] is None else str(row[name]) for name in header] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    print(f"usage since {iso(since)} ({where_store(store)})", file=out)
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip(), file=out)
