"""Everything subcommands hand each other on disk, read and written in one place.

An artifact is a folder: tensors in safetensors files and a `manifest.json` that
says what made it (kind, format version, full config, hashes of its inputs and of
its own files, package version, creation time, metrics). Every file is written
atomically (temp file, fsync, rename) and the manifest is written last, so a
folder without a manifest is unfinished and no command mistakes it for a whole one.
A temp file is `.NAME.XXXXXXXX.tmp/NAME`: whatever the writer (a library) makes
beside it stays in that folder, which the next run that holds the folder removes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import UserError

MANIFEST = "manifest.json"
LOCK = ".lock"  # see hold_folder
# Temp files a killed writer leaves: atomic_path's, other writers' `.NAME.XXX.tmp`, and safetensors'
# own `.tmpXXXXXX` beside its target (from before atomic_path gave it a folder of its own).
_TEMPORARY = re.compile(r"\..+\.tmp|\.tmp[A-Za-z0-9]{6}")
# mkstemp makes owner-only files; outputs get what open() would give them. Read once: the
# umask can only be read by setting it, which is not safe while other threads create files.
_FILE_MODE = 0o666 & ~(_umask := os.umask(0o022))
os.umask(_umask)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path, in a temporary folder beside `path`; on success fsync it and
    rename it over `path`. On any exception the temporary folder is removed and `path` is left
    untouched; a kill leaves the folder, which `hold_folder` removes on the next run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = folder / path.name
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _apart(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the CPU, contiguous, none sharing storage with another (safetensors
    refuses shared storage). Each is copied only where one of these needs it: a checkpoint
    of DiT-XL/2 is 11 GB, and a copy of all of it would double the host memory saving takes."""
    out, storages = {}, set()
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        if v.untyped_storage().data_ptr() in storages:
            v = v.clone()
        storages.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def save_weights(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a flat dict of tensors to safetensors, atomically."""
    tensors = _apart(tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)  # by its own temp file (in ours), which is 0600
        os.chmod(tmp, _FILE_MODE)


def _tensors_in(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(key path, tensor) of every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors_in(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors_in(v, f"{prefix}.{i}" if prefix else str(i))


def _refuse_non_finite(path: Path, obj: Any) -> None:
    # NaN weights sample NaN images and train NaN losses, whatever hash vouches for the file.
    for key, t in _tensors_in(obj):
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise UserError(f"{path} holds NaN or infinite values (first in {key}), so it is no usable weights file; "
                            f"re-create it (from a checkpoint before the values broke) or pass another file")


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file that is unreadable or holds NaN or infinity is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); re-create it or pass another file") from None
    _refuse_non_finite(path, tensors)
    return tensors


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def torch_load(path: str | os.PathLike, map_location: str = "cpu", allow: Sequence[type] = (),
               data: bytes | None = None) -> Any:
    """`torch.load` restricted to tensors, plain containers and the classes in `allow` (which
    must run no code): never runs code from the file. `data`: the file's bytes, already read
    (so that what the caller hashed is what is loaded). Failures, and NaN or infinite values,
    are one line."""
    path = Path(path)
    if data is None and not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allow)):
            obj = torch.load(path if data is None else io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for bad or unsafe pickles
        # torch's own text advises weights_only=False, which would run the file's code: none of it is repeated.
        text = _ANSI.sub("", str(e)).strip()
        unsafe = re.search(r"GLOBAL (\S+?)[.,]?(?:\s|$)", text)
        if unsafe:
            raise UserError(f"{path} is not a plain weights file: it holds an object of class {unsafe[1]}, and rebuilding it could run "
                            f"code, so it is not loaded; pass a .safetensors file, or a .pt/.pth of tensors alone "
                            f"(a state dict)") from None
        _, found, rest = text.partition("WeightsUnpickler error:")
        reason = [line.strip() for line in (rest if found else text).splitlines()
                  if line.strip() and "weights_only" not in line]
        why = type(e).__name__ + (f": {reason[0]}" if reason else "")
        raise UserError(f"cannot load {path} as a plain tensor checkpoint ({why})") from None
    _refuse_non_finite(path, obj)
    return obj


# -- nested state (checkpoints): tensors in safetensors, structure in its metadata ------------

def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "_"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"cannot save dict keys of type {[type(k) for k in obj]}")
        return {"__dict__": [[k, _flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save value of type {type(obj).__name__} at {prefix!r}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: str | os.PathLike, state: Any) -> None:
    """Save nested dicts/lists/tuples of tensors and plain values (a training checkpoint)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, "", tensors)
    save_weights(path, tensors, metadata={"reals_tree": json.dumps(tree)})


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:  # one open: the file may be replaced (atomically) by a newer checkpoint meanwhile
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); re-create it or pass another file") from None
    if "reals_tree" not in meta:
        raise UserError(f"{path} is not a reals checkpoint (no state tree in its metadata)")
    return _unflatten(json.loads(meta["reals_tree"]), tensors)


# -- manifests ---------------------------------------------------------------------------------

def describe_input(path: str | os.PathLike) -> dict[str, str]:
    """How a manifest records one input: an artifact by its manifest id, a file by its sha256."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        m = json.loads((path / MANIFEST).read_text())
        return {"path": str(path), "kind": m.get("kind", "?"), "id": m.get("id", "?")}
    if path.is_file():
        return {"path": str(path), "sha256": sha256_file(path)}
    return {"path": str(path)}


def artifact_id(kind: str, config: dict, files: dict[str, str]) -> str:
    canon = json.dumps({"kind": kind, "config": config, "files": files}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


# The `reals ...` command line running now and when it started; the CLI sets it, so every
# artifact records what made it and how long that took (None when called from Python).
invocation: dict | None = None


def provenance() -> dict:
    """{"command", "wall_s"} of the running `reals` command, for manifests and metric files."""
    if invocation is None:
        return {"command": None, "wall_s": None}
    return {"command": invocation["command"], "wall_s": round(time.time() - invocation["started"], 1)}


def write_manifest(
    directory: str | os.PathLike,
    kind: str,
    format_version: int,
    config: dict,
    inputs: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    files: list[str] | None = None,
) -> dict:
    """Write `manifest.json` last, after the files it lists, which it hashes.

    `id` is a short hash of (kind, config, file hashes): two artifacts with the same id
    hold the same weights made the same way, which is what later commands compare.
    """
    directory = Path(directory)
    hashes = {name: sha256_file(directory / name) for name in (files or [])}
    manifest = {
        "kind": kind,
        "format_version": format_version,
        "id": artifact_id(kind, config, hashes),
        "config": config,
        "inputs": inputs or {},
        "files": hashes,
        "metrics": metrics or {},
        "reals_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **provenance(),
    }
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def made_by(manifest: dict) -> str:
    """The words ` made by `COMMAND`` for a message about an artifact whose manifest records its command."""
    return f" made by `{manifest['command']}`" if manifest.get("command") else ""


_HELD: set = set()  # the lock files open in this process


def _close_held_in_child() -> None:
    # A forked child (a DataLoader worker) shares the parent's open lock file, and with it the
    # lock, which would outlive the run while the worker lives: the child closes its copy at once.
    for handle in list(_HELD):
        handle.close()


os.register_at_fork(after_in_child=_close_held_in_child)


def discard_temporary(folder: str | os.PathLike, keep: Sequence[str] = ()) -> None:
    """Remove the temp files (and atomic_path's temp folders) that killed writers left in `folder`
    and its subfolders, except in the subfolders named in `keep`. Only for a folder that no other
    process writes into now."""
    for entry in Path(folder).iterdir():
        if _TEMPORARY.fullmatch(entry.name):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
        elif entry.is_dir() and not entry.is_symlink() and entry.name not in keep:
            discard_temporary(entry)


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, command: str, keep: Sequence[str] = (), option: str = "--out") -> Iterator[None]:
    """Take `folder` (created if need be) while the block runs: a second run into the same --out,
    a job submitted twice, stops at once instead of interleaving its writes with this one's. On a
    filesystem without locks (some NFS and FUSE mounts) the run goes on with a warning. Once held,
    the temp files of a killed run are removed (see discard_temporary; `keep`: subfolders that other
    ranks of this run may be writing into already; `option`: how the error names the folder's flag)."""
    import errno
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a") as handle:  # the lock goes with the file's closing
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{folder} is being written by another `{command}` process; wait for it to end, or "
                            f"pass another {option}") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            from .console import warn

            warn(f"{folder}: this filesystem has no file locks ({e.strerror}); nothing stops a second run into it")
        else:
            discard_temporary(folder, keep)  # only when held: another run's writes may be in flight otherwise
        _HELD.add(handle)
        try:
            yield
        finally:
            _HELD.discard(handle)


def check_writable(folder: str | os.PathLike, option: str, given: str | os.PathLike) -> None:
    """Refuse, as one line before the work instead of a traceback after it, a `folder` (where the
    value `given` of `option` will be written) that could not be made or written: one under a
    file, or in a read-only place. Nothing is left behind: the test is a file made and removed
    in the folder, or in the nearest one above it that exists (where it would be made)."""
    folder = Path(folder).absolute()
    above = next(p for p in (folder, *folder.parents) if p.exists())
    if not above.is_dir():
        raise UserError(f"{option} {given} is under {above}, which is a file; pass a path in a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=above)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{option} {given} cannot be written: {above} refuses new files ({e.strerror or e}); pass a "
                        f"folder you can write to") from None


def check_output_folder(out: str | os.PathLike, kind: str, written: Sequence[str], command: str) -> dict | None:
    """--out of a command that makes `kind` artifacts: writable, and new, empty, or its own. Its
    own is finished (a `kind` manifest, returned) or unfinished (only names matching the glob
    patterns `written`, and hidden temporary files). Anything else is refused: writing there
    would mix with, or make unusable, what is there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    check_writable(out, "--out", out)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.get("kind") != kind:
            raise UserError(f"--out {out} holds a '{manifest.get('kind')}' artifact{made_by(manifest)}, not {command}'s; "
                            f"pass a new --out")
        return manifest
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir()
                         if not p.name.startswith(".") and not any(fnmatch.fnmatchcase(p.name, w) for w in written))
        if foreign:
            raise UserError(f"--out {out} holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}, which "
                            f"{command} did not write; pass a new or empty --out")
    return None


def check_output_file(path: str | os.PathLike, option: str, example: str) -> None:
    """Refuse, before any work, a file path that the end of the run could not write: a folder, a
    path under a file, or one in a folder that cannot be written. `example` is a file name to
    suggest inside a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; pass a file path, e.g. {path / example}")
    check_writable(path.parent, option, path)


def _remedy(directory: Path, manifest: dict) -> str:
    return f"delete {directory} and run `{manifest['command']}` again" if manifest.get("command") else "re-create the artifact"


def read_manifest(directory: str | os.PathLike, kind: str | None = None, format_version: int | None = None,
                  needs: Sequence[str] = ()) -> dict:
    """Read and check an artifact's manifest, and that its config has the keys `needs`; every
    mismatch names both sides and a remedy."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.exists():
        raise UserError(f"{directory} does not exist")
    if not path.is_file():
        raise UserError(
            f"{directory} has no {MANIFEST}: it is not a reals artifact, or the run that made it did not finish "
            f"(re-run the command that makes it, with --resume if it supports it)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-create the artifact") from None
    if kind is not None and manifest.get("kind") != kind:
        raise UserError(f"{directory} is a '{manifest.get('kind')}' artifact, but a '{kind}' artifact is needed here")
    if format_version is not None and manifest.get("format_version") != format_version:
        raise UserError(
            f"{directory} has {manifest.get('kind')} format version {manifest.get('format_version')}, "
            f"this reals reads version {format_version}; re-create it with reals {__version__}"
        )
    config = manifest.get("config")
    missing = [k for k in needs if not isinstance(config, dict) or k not in config]
    if missing:  # edited by hand, or damaged: a KeyError later would be a traceback
        raise UserError(f"{path} lacks {', '.join(missing)} in its config (edited or damaged); "
                        f"{_remedy(directory, manifest)}")
    return manifest


def verify_files(directory: str | os.PathLike, manifest: dict, names: list[str] | None = None) -> None:
    """Check the files the manifest lists (or those of them in `names`) against their recorded sha256."""
    directory = Path(directory)
    remedy = _remedy(directory, manifest)
    for name, expected in manifest.get("files", {}).items():
        if names is not None and name not in names:
            continue
        f = directory / name
        if not f.is_file():
            raise UserError(f"{f} is missing (listed in {directory / MANIFEST}); {remedy}")
        if sha256_file(f) != expected:
            raise UserError(f"{f} does not match the hash in its manifest (corrupt or replaced); {remedy}")
