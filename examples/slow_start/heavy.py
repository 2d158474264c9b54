"""A stand-in for a heavy framework: slow to import, big once imported.

Importing a real framework (Django, Rails in Passenger's world) costs
hundreds of milliseconds of CPU and leaves tens of megabytes of loaded code
and precomputed data behind. This module does the same kind of real work at
import, with no sleeping:

* it imports a few dozen standard-library modules, as a framework's import
  graph would; and
* it computes a 48 MiB lookup table (BLAKE2b fingerprints of the integers
  0..N-1), standing for compiled templates, routing tables, translations.

The table is one ``bytes`` object. After a fork its pages stay shared
copy-on-write: the only word the children write is the object's reference
count, on the first page. (Millions of small Python objects would not stay
shared, since every refcount change dirties the page it sits on.) That is
what lets a forking spawner run many instances in little more memory than
one.
"""

from __future__ import annotations

import hashlib
import importlib
import time

_cpu_start = time.process_time()

# Modules a web framework and its dependencies typically pull in.
STDLIB_MODULES = (
    "argparse",
    "asyncio",
    "calendar",
    "concurrent.futures",
    "configparser",
    "csv",
    "dataclasses",
    "decimal",
    "difflib",
    "email.mime.multipart",
    "email.parser",
    "fractions",
    "html.parser",
    "http.cookies",
    "inspect",
    "json",
    "logging.handlers",
    "smtplib",
    "sqlite3",
    "statistics",
    "tarfile",
    "tomllib",
    "urllib.request",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "xmlrpc.client",
    "zipfile",
)
for _name in STDLIB_MODULES:
    importlib.import_module(_name)

ENTRY_SIZE = 64
"""Bytes per table entry: one 512-bit BLAKE2b digest."""

TABLE_SIZE = 48 * 1024 * 1024
"""Bytes in :data:`TABLE`."""


def _build_table() -> bytes:
    # One Python-level hash call per entry, like the many small steps of a
    # real start-up, written into a single preallocated buffer so that no
    # per-entry objects outlive the loop.
    buffer = bytearray(TABLE_SIZE)
    blake2b = hashlib.blake2b
    for i in range(TABLE_SIZE // ENTRY_SIZE):
        offset = i * ENTRY_SIZE
        buffer[offset : offset + ENTRY_SIZE] = blake2b(
            i.to_bytes(8, "little"), digest_size=ENTRY_SIZE
        ).digest()
    # Immutable from here on: nothing can dirty the shared pages by accident.
    return bytes(buffer)


TABLE = _build_table()
"""The precomputed lookup table, 48 MiB."""

IMPORT_CPU_SECONDS = time.process_time() - _cpu_start
"""CPU seconds this module's import took (for checking it is really heavy)."""


def lookup(key: bytes) -> int:
    """One byte of the table, chosen by ``key``: a read that touches one page."""
    index = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return TABLE[index % TABLE_SIZE]
