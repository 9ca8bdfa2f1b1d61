"""Cache keys follow the code that decides a stage's output: docstrings and messages don't count, code does.

Each test edits a copy of the repository (never the checkout) and compares the stage keys computed from it.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from stages import prepare_data, train
from stages.caching import REPO, code_digest, code_version, stage_key

PACKAGES = ("flows", "stages", "trainer_core")


def tokenization_code(repo: Path) -> tuple[Path, str]:
    """Where the tokenization of the default task lives: (file, function name). Repoint here if it moves."""
    return repo / "trainer_core" / "tasks" / "text_classification.py", "tokenize"


@pytest.fixture
def repo_copy(tmp_path: Path) -> Callable[[str], Path]:
    """A fresh copy of the project's packages under tmp_path/<name> (one per variant: keys are cached per path)."""

    def copy(name: str) -> Path:
        root = tmp_path / name
        for package in PACKAGES:
            shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
        return root

    return copy


def _keys(repo: Path) -> dict[str, str]:
    """prepare_data's and train's keys for fixed parameters: only the code component can differ."""
    params = {"task": {"name": "t"}, "model": {"name": "m"}, "paths": {"root": "/x"}}
    return {
        "prepare_data": stage_key("prepare_data", params, prepare_data.CODE, repo=repo),
        "train": stage_key("train", {"trainer": {"learning_rate": 1e-3}, "run": None}, train.CODE, repo=repo),
    }


def _replace(path: Path, node: ast.AST, new_text: str) -> None:
    """Replace one node's source text (found by the AST, not by line number)."""
    lines = path.read_text().splitlines(keepends=True)
    start = sum(len(line) for line in lines[: node.lineno - 1]) + node.col_offset
    end = sum(len(line) for line in lines[: node.end_lineno - 1]) + node.end_col_offset
    text = "".join(lines)
    path.write_text(text[:start] + new_text + text[end:])


def _nodes(path: Path, kind: type[ast.AST], inside: str | None = None) -> list:
    tree = ast.parse(path.read_text())
    if inside is not None:
        tree = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == inside)
    return [n for n in ast.walk(tree) if isinstance(n, kind)]


def _edit_docstring(path: Path, owner: str | None) -> None:
    """Reword the docstring of class/function `owner` (None: of the module)."""
    if owner is None:
        owner_node = ast.parse(path.read_text())
    else:
        owner_node = next(n for n in _nodes(path, ast.ClassDef | ast.FunctionDef) if n.name == owner)
    docstring = owner_node.body[0].value
    assert isinstance(docstring, ast.Constant) and isinstance(docstring.value, str), f"{owner} has no docstring"
    _replace(path, docstring, repr("Reworded for a newcomer."))


def _edit_first_message(path: Path, function: str) -> None:
    """Reword the first message of `function`: a `raise X(...)` argument or an `errors.append(...)` string."""
    for call in _nodes(path, ast.Call, inside=function):
        is_append = isinstance(call.func, ast.Attribute) and call.func.attr == "append"
        if call.args and (is_append and ast.unparse(call.func.value) == "errors"):
            _replace(path, call.args[0], repr("something is wrong: fix it."))
            return
    for raise_node in _nodes(path, ast.Raise, inside=function):
        if isinstance(raise_node.exc, ast.Call) and raise_node.exc.args:
            _replace(path, raise_node.exc.args[0], repr("something is wrong: fix it."))
            return
    raise AssertionError(f"no message found in {function} of {path}")


def _edit_code(path: Path, function: str) -> None:
    """Change real code: flip the first bool/number literal of `function` (e.g. truncation=True)."""
    for constant in _nodes(path, ast.Constant, inside=function):
        if isinstance(constant.value, bool):
            _replace(path, constant, repr(not constant.value))
            return
        if isinstance(constant.value, int | float):
            _replace(path, constant, repr(constant.value + 1))
            return
    raise AssertionError(f"no literal to change in {function} of {path}")


def test_the_copy_keys_like_the_checkout(repo_copy) -> None:
    assert _keys(repo_copy("base")) == _keys(REPO)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda r: _edit_docstring(r / "stages" / "schema.py", None), id="schema-docstring"),
        pytest.param(lambda r: _edit_docstring(r / "stages" / "schema.py", "validate"), id="schema-validate-doc"),
        pytest.param(lambda r: _edit_first_message(r / "stages" / "schema.py", "validate"), id="schema-message"),
        pytest.param(lambda r: _edit_docstring(r / "trainer_core" / "args.py", "validate"), id="args-docstring"),
        pytest.param(lambda r: _edit_first_message(r / "trainer_core" / "args.py", "validate"), id="args-message"),
    ],
)
def test_docstrings_and_messages_leave_the_keys_alone(repo_copy, edit: Callable[[Path], None]) -> None:
    base, edited = repo_copy("base"), repo_copy("edited")
    edit(edited)
    assert _keys(edited) == _keys(base)


def test_comments_and_attribute_docstrings_leave_the_keys_alone(repo_copy) -> None:
    base, edited = repo_copy("base"), repo_copy("edited")
    args = edited / "trainer_core" / "args.py"
    field_doc = next(n for n in _nodes(args, ast.Expr, inside="TrainingArguments")
                     if isinstance(n.value, ast.Constant) and isinstance(n.value.value, str))
    _replace(args, field_doc, '"""Reworded field documentation."""  # and a comment')
    assert _keys(edited) == _keys(base)


def test_tokenization_code_changes_the_prepare_data_key(repo_copy) -> None:
    base, edited = repo_copy("base"), repo_copy("edited")
    path, function = tokenization_code(edited)
    before = code_digest(path)
    _edit_code(path, function)
    assert code_digest(path) != before
    assert _keys(edited)["prepare_data"] != _keys(base)["prepare_data"]


def test_log_messages_do_not_count_but_their_arguments_do(tmp_path: Path) -> None:
    source = tmp_path / "stage.py"

    def digest(text: str) -> str:
        source.write_text(text)
        return code_digest(source)

    base = digest('log.info("ran %d steps", steps)\nerrors.append(f"bad {key}")\nraise ValueError("no")\n')
    assert digest('log.info("did %d steps", steps)\nerrors.append(f"wrong {key}")\nraise ValueError("nope")\n') == base
    assert digest('log.info("ran %d steps", epochs)\nerrors.append(f"bad {key}")\nraise ValueError("no")\n') != base
    assert digest('log.info("ran %d steps", steps)\nerrors.append(f"bad {key}")\nraise KeyError("no")\n') != base


FACTS_SCRIPT = """
import json, sys
from pathlib import Path
import stages.caching as caching
from stages import train
parses = []
parse = caching._parse_facts
caching._parse_facts = lambda source, path: parses.append(path.name) or parse(source, path)
version = caching.code_version(*train.CODE, repo=Path(sys.argv[1]))
print(json.dumps({"version": version, "parses": parses}))
"""


def _facts_process(repo: Path, cache: Path) -> dict:
    """train's code version computed in a new process whose user cache is `cache`, and which files it parsed."""
    done = subprocess.run([sys.executable, "-c", FACTS_SCRIPT, str(repo)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "XDG_CACHE_HOME": str(cache)}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_code_facts_are_remembered_by_content_across_processes(repo_copy, tmp_path: Path) -> None:
    repo, cache = repo_copy("base"), tmp_path / "cache"
    first = _facts_process(repo, cache)
    assert len(first["parses"]) > 20  # every .py file of train's code, once
    assert first["version"] == code_version(*train.CODE, repo=repo)  # what this process's parse gives
    second = _facts_process(repo, cache)
    assert second == {"version": first["version"], "parses": []}  # all from the memo, the same version

    # new bytes, the same size and modification time: parsed again (the memo's key is the content)
    path, function = tokenization_code(repo)
    stat = path.stat()
    _edit_code(path, function)
    text = path.read_text().rstrip("\n")  # the edit changed the length by a character or two: restore it
    path.write_text(text + "\n" * (stat.st_size - len(text.encode())))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    third = _facts_process(repo, cache)
    assert third["parses"] == [path.name]
    assert third["version"] != first["version"]

    # a memo that cannot be read costs a parse, and is written anew
    memo = next((cache / "finetune").glob("code-facts-*.json"))
    memo.write_text("{not json")
    fourth = _facts_process(repo, cache)
    assert len(fourth["parses"]) == len(first["parses"]) and fourth["version"] == third["version"]
    assert _facts_process(repo, cache)["parses"] == []
