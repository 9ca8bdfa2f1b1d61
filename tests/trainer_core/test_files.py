"""trainer_core.files: atomic writes that several threads of one process may do at once."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from trainer_core.files import write_json_atomic


def test_threads_writing_the_same_json_file_at_once_never_meet(tmp_path) -> None:
    """Two sweep trials of one process record the same stage's last key together: each write is whole."""
    path = tmp_path / "last_key.json"
    payloads = [{"writer": i, "padding": "x" * 4096} for i in range(64)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda payload: write_json_atomic(path, payload), payloads))  # raises if a rename failed
    assert json.loads(path.read_text()) in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["last_key.json"]  # no temporary file left
