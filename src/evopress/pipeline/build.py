"""``build-db``: a space's level database for one model and calibration text."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..data import DEFAULT_CALIBRATION, bos_token, check_source, load_pool
from ..errors import UserError
from ..models import Hardware
from ..spaces import get_plugin


@dataclass
class DatabaseRequest:
    """What ``build-db`` builds: a space's level database for one model and calibration text."""

    space: str
    out: Path
    options: dict[str, Any]  # the space's builder options
    model: str | None = None
    data: str = DEFAULT_CALIBRATION
    device: str | None = None
    dtype: str | None = None
    seq_len: int = 256
    calib_tokens: int = 16384
    batch_size: int = 8
    bos: str = "auto"
    device_map: str | None = None  # blocks spread or offloaded as in a search (placement.py)
    max_memory: str | None = None


def build_database(request: DatabaseRequest, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    plugin = get_plugin(request.space)
    if plugin.build is None:
        raise UserError(f"space '{request.space}' needs no database")
    check_source(request.data)
    loaded = Hardware(request.device, request.dtype, request.device_map, request.max_memory).load(request.model, log)
    pool = load_pool(loaded.tokenizer, request.data, "calibration", request.seq_len, request.calib_tokens,
                     bos_token(loaded.tokenizer, request.bos))
    start = time.perf_counter()  # the builder checks its options first: a refusal is its one line
    manifest = plugin.build(loaded.decoder, pool, request.options, Path(request.out), request.batch_size, progress)
    log(f"'{request.space}' database for {loaded.name} on {pool.tokens} tokens of '{request.data}' written to "
        f"{request.out} in {time.perf_counter() - start:.0f} s")
    for line in manifest.get("summary", ()):  # what the space wants its user to know of the database
        log(line)
    return manifest
