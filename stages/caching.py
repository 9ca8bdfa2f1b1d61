"""Content-addressed cache keys for the stages.

A stage's key hashes (1) the config subtrees and input Refs it is called with, (2) the code that decides its
output: its own module, the project modules it imports (transitively) and any package it names, e.g. the
train stage names trainer_core, which it launches rather than imports. Prefect's default policy includes
the flow run id and TASK_SOURCE misses edited helpers, hence this.

What of a source file counts (`code_digest`): its syntax tree, not its text, less what only talks to people.
Comments and formatting vanish in the tree anyway; removed from it are
  - docstrings, and any other string literal standing alone as a statement (the attribute docstrings under
    dataclass fields);
  - messages: the arguments of `raise X(...)`, the string arguments (literals, f-strings) of logging calls
    (`<logger>.debug/info/warning/warn/error/exception/critical/log(...)` where the receiver's name contains
    "log", and `warnings.warn`), and whatever is appended to a list named `errors` (`errors.append(...)`:
    the cross-field checks' messages).
So rewording an error or a docstring reuses every cached stage; changing what a stage computes re-runs it.
Other files a package ships (.json, .yaml) count byte for byte.

Prefect stores one JSON record per key under its result storage (paths.results: a folder or any fsspec URL).
Before answering, the key function checks
that the Ref stored for that key is still valid (files present, fingerprints match); if not it drops the
record, so a cache hit whose files are gone becomes a miss instead of a crash downstream.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stages.refs import Ref, write_json_atomic
from stages.schema import stable_hash
from trainer_core.files import sha256_file, user_cache_dir

REPO = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("flows", "stages", "trainer_core")
NOT_IN_KEY = frozenset({"run"})
"""Parameters that say where to report (MLflow run), not what to compute."""


def _module_path(name: str, repo: Path) -> Path | None:
    base = repo.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path) -> frozenset[str]:
    """The project modules a .py file imports."""
    return _source_facts(path)[1]


def _source_facts(path: Path) -> tuple[str, frozenset[str]]:
    """(code_digest, project imports) of a file, computed once per file version from one parse: the stages of
    one flow share most of their files (trainer_core)."""
    stat = path.stat()
    return _facts_of_version(path, stat.st_mtime_ns, stat.st_size)


@functools.cache
def _facts_of_version(path: Path, _mtime_ns: int, _size: int) -> tuple[str, frozenset[str]]:
    if path.suffix != ".py":
        return sha256_file(path), frozenset()
    source = path.read_bytes()
    content = hashlib.sha256(source).hexdigest()
    memo = _FactsMemo.get()
    if (known := memo.lookup(content)) is not None:
        return known[0], frozenset(known[1])
    digest, imports = _parse_facts(source, path)
    memo.add(content, digest, imports)
    return digest, imports


def _parse_facts(source: bytes, path: Path) -> tuple[str, frozenset[str]]:
    tree = ast.parse(source, filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    imports = frozenset(n for n in names if n.split(".")[0] in PROJECT_PACKAGES)
    stripped = _WithoutMessages().visit(tree)  # after the walk: it edits the tree in place
    return hashlib.sha256(ast.dump(stripped, annotate_fields=False).encode()).hexdigest(), imports


class _FactsMemo:
    """(code digest, imports) of .py sources by the SHA-256 of their bytes, kept across processes in the user's
    cache folder: parsing the ~70 files of a flow's stages costs ~0.5 s, reading them and this memo ~10 ms. One
    file per Python version (ast.dump's output differs between versions) and per version of this module's rules
    (an edit of stages/caching.py starts a new memo). A memo that cannot be read or written only costs the parse."""

    _instance: _FactsMemo | None = None
    LIMIT = 4096
    """Entries kept at most; beyond it a save keeps only what this process used."""

    def __init__(self, path: Path):
        import threading

        self.path = path
        self.new: dict[str, list] = {}
        self.used: set[str] = set()
        self._lock = threading.Lock()  # a sweep's trials key their stages in threads of one process
        try:
            self.facts: dict[str, list] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.facts = {}

    @classmethod
    def get(cls) -> _FactsMemo:
        if cls._instance is None:
            import sys

            rules = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
            version = f"py{sys.version_info[0]}{sys.version_info[1]}"
            cls._instance = cls(user_cache_dir() / f"code-facts-{version}-{rules}.json")
        return cls._instance

    def lookup(self, content: str) -> list | None:
        self.used.add(content)
        return self.facts.get(content)

    def add(self, content: str, digest: str, imports: frozenset[str]) -> None:
        self.facts[content] = self.new[content] = [digest, sorted(imports)]

    def save(self) -> None:
        """Merged with what other processes saved meanwhile (entries never change: the key is the content)."""
        with self._lock:
            if not self.new:
                return
            try:
                merged = {**json.loads(self.path.read_text()), **self.new}
            except (OSError, ValueError):
                merged = dict(self.new)
            if len(merged) > self.LIMIT:
                merged = {content: merged[content] for content in self.used if content in merged}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.path, merged, indent=None)
                self.new = {}
                for stale in self.path.parent.glob(self.path.name.rsplit("-", 1)[0] + "-*.json"):
                    if stale != self.path:  # an earlier version of the rules
                        stale.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only home: the next process parses again


@functools.cache
def code_files(*modules: str, repo: Path = REPO) -> tuple[Path, ...]:
    """Source files of these modules and of every project module they import, transitively.

    A name that is a package pulls in every file under it (trainer_core runs as a whole in each rank).
    """
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        package_dir = repo.joinpath(*name.split("."))
        if name in modules and (package_dir / "__init__.py").is_file():
            for file in package_dir.rglob("*"):
                if file.suffix in (".py", ".json", ".yaml") and "__pycache__" not in file.parts and file not in seen:
                    seen.add(file)
                    if file.suffix == ".py":
                        todo.extend(_imports(file))
            continue
        path = _module_path(name, repo)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(_imports(path))
    _FactsMemo.get().save()
    return tuple(sorted(seen))


# --- what of a source file counts ------------------------------------------------------------------

LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical", "log"})
ERROR_LISTS = frozenset({"errors"})


def _dotted(node: ast.expr) -> str:
    """`self.logger` for an attribute chain, `log` for a name, "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _is_text(node: ast.expr) -> bool:
    """A string literal, an f-string, or a concatenation / %-format / .format() built from one."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp):
        return _is_text(node.left) or _is_text(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _is_text(node.func.value)
    return False


def _is_log_call(call: ast.Call) -> bool:
    if not isinstance(call.func, ast.Attribute) or call.func.attr not in LOG_METHODS:
        return False
    receiver = _dotted(call.func.value).rsplit(".", 1)[-1].lower()
    return "log" in receiver or receiver == "warnings"


def _is_error_append(call: ast.Call) -> bool:
    return (isinstance(call.func, ast.Attribute) and call.func.attr == "append"
            and _dotted(call.func.value).rsplit(".", 1)[-1] in ERROR_LISTS)


class _WithoutMessages(ast.NodeTransformer):
    """Drops docstrings and messages from a tree (the rule in the module docstring)."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for name in ("body", "orelse", "finalbody"):
            body = getattr(node, name, None)
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                kept = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                and isinstance(s.value.value, str))]
                # a body of nothing but a docstring still needs a statement
                setattr(node, name, kept or ([ast.Pass()] if name == "body" else []))
        return node

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.exc, ast.Call):
            node.exc.args, node.exc.keywords = [], []
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if _is_error_append(node):
            node.args, node.keywords = [], []
        elif _is_log_call(node):
            node.args = [arg for arg in node.args if not _is_text(arg)]
        return node


def code_digest(path: Path) -> str:
    """SHA-256 of what in this file decides results: a .py file's tree without docstrings and messages; any
    other file's bytes."""
    return _source_facts(path)[0]


@functools.cache
def code_version(*modules: str, repo: Path = REPO) -> str:
    """Hash of the code, once per process: a process runs what it imported, so a Prefect retry keys (and
    resumes) the same run folder even if the files on disk were edited meanwhile."""
    digest = hashlib.sha256()
    for file in code_files(*modules, repo=repo):
        digest.update(str(file.relative_to(repo)).encode())
        digest.update(code_digest(file).encode())
    return digest.hexdigest()


def key_components(parameters: dict[str, Any], code: tuple[str, ...], repo: Path = REPO) -> dict[str, str]:
    components = {name: stable_hash(value) for name, value in parameters.items() if name not in NOT_IN_KEY}
    components["code"] = code_version(*code, repo=repo)
    return components


def stage_key(stage: str, parameters: dict[str, Any], code: tuple[str, ...], repo: Path = REPO) -> str:
    """`<stage>-<24 hex>`; `repo` is where the code is read from (a test's copy of the repository)."""
    return f"{stage}-{stable_hash(key_components(parameters, code, repo))[:24]}"


def stage_dir(root: str | Path, key: str) -> Path:
    stage = key.rsplit("-", 1)[0]
    return Path(root) / "stages" / stage / key


def _results_dir() -> Path:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

    return Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value())


def _drop_record(context: Any, key: str) -> None:
    """Delete the record Prefect keeps for `key`, through the filesystem it keeps it in: the task run's result
    storage (paths.results: a local folder or any fsspec URL), else Prefect's local default."""
    storage = getattr(getattr(context, "result_store", None), "result_storage", None)
    basepath = getattr(storage, "basepath", None)
    if basepath and "://" in str(basepath):  # RemoteFileSystem: s3://, gs://, ...
        filesystem, path = storage.filesystem, f"{str(basepath).rstrip('/')}/{key}"
        if filesystem.exists(path):
            filesystem.rm(path)
        return
    (Path(basepath).expanduser() if basepath else _results_dir()).joinpath(key).unlink(missing_ok=True)


def cache_key_fn(stage: str, code: tuple[str, ...]) -> Callable[[Any, dict[str, Any]], str]:
    """Prefect cache_key_fn for a stage whose parameters include `paths` (PathsConfig)."""

    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        key = stage_key(stage, parameters, code)
        ref = Ref.load(stage_dir(parameters["paths"].root, key) / "ref.json")
        if ref is None or not ref.is_valid():
            # What the record points at is gone or altered: forget it so that the stage runs again.
            _drop_record(context, key)
        return key

    return key_fn


def explain_miss(stage: str, root: str | Path, components: dict[str, str], logger: logging.Logger) -> None:
    """Log which part of the key changed since this stage last ran (config subtree, input, or code)."""
    last_path = Path(root) / "stages" / stage / "last_key.json"
    try:
        last = json.loads(last_path.read_text())
    except (OSError, ValueError):
        last = None
    if last is None:
        logger.info("%s: cache miss (first run under %s)", stage, root)
    else:
        changed = sorted(name for name in components if components.get(name) != last.get(name))
        reason = ", ".join(changed) if changed else "its stored result is missing or no longer valid"
        logger.info("%s: cache miss (changed: %s)", stage, reason)
    last_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(last_path, components)


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run; a plain logger when a test calls `task.fn` directly."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError and friends: not inside a run
        return logging.getLogger("stages")


def begin_stage(stage: str, parameters: dict[str, Any], code: tuple[str, ...]) -> Path:
    """Called by a stage body (so: on a cache miss). Logs why it missed; returns its empty output folder."""
    import shutil

    components = key_components(parameters, code)
    key = f"{stage}-{stable_hash(components)[:24]}"
    root = parameters["paths"].root
    explain_miss(stage, root, components, stage_logger())
    out = stage_dir(root, key)
    if out.exists():
        shutil.rmtree(out)  # a leftover without a valid ref.json: never trusted
    out.mkdir(parents=True)
    return out


@contextlib.contextmanager
def key_lock(folder: str | Path, logger: logging.Logger | logging.LoggerAdapter, what: str = "") -> Iterator[None]:
    """Hold `<folder>.lock` exclusively: one writer per stage key, across processes (and machines on a shared
    paths.root). An flock dies with its process: a lock left by a killed flow is free again, never stale."""
    path = Path(folder).with_name(Path(folder).name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            logger.info("%s: another process (pid %s) is computing %s; waiting for it", what or path.stem, holder,
                        Path(folder).name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def single_writer(stage: str, code: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Decorates a stage body (under its @task): two flows computing the same key at once compute it once. The
    second waits on the key's lock, then finds the first one's valid ref.json and returns it."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            parameters = dict(bound.arguments)
            out = stage_dir(parameters["paths"].root, stage_key(stage, parameters, code))
            with key_lock(out, stage_logger(), stage):
                ref = Ref.load(out / "ref.json")
                if ref is not None and ref.is_valid():
                    stage_logger().info("%s: computed meanwhile by another flow; using its result", stage)
                    return ref
                return fn(*args, **kwargs)

        return body

    return decorate
