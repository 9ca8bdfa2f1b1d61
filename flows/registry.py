"""Look up and move the registered models of the MLflow registry that the finetune flow writes to.

    python -m flows.registry list                          # every registered model: versions, aliases, gate
    python -m flows.registry show rt_reviews-minilm_l6     # the champion: tags, aliases, gate decision, metrics
    python -m flows.registry show rt_reviews-minilm_l6 3   # version 3
    python -m flows.registry promote rt_reviews-minilm_l6 3   # champion -> v3 by hand (tagged promoted_by=manual)
    python -m flows.registry rollback rt_reviews-minilm_l6    # champion -> the champion before the current one

The registry is the flow's: --tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<paths.root>/mlflow.db
(paths.root of conf/, `.finetune` under the current directory; --root changes it). A team server works the same:
--tracking-uri http://127.0.0.1:5000.

History: a manual promotion tags the version promoted_by=manual, promoted_from=<previous champion>,
promoted_at, and appends to the registered model's tag `champion_history` (JSON). The flow's automatic
promotions record the champion they replaced in the version's gate.champion_version tag. Rollback follows those
version tags back from the current champion: the promoted_from tag of a manual promotion, else the
gate.champion_version of an automatic one.

Bad input (an unknown model, version or alias, a store that does not exist, a server that does not answer)
prints one line starting with `error:` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from stages.health import probe
from stages.tracking import CHAMPION, CHAMPION_HISTORY, champion_history

HISTORY_KEEP = 30  # entries of champion_history kept: a tag value has a length limit


class RegistryError(Exception):
    """Bad input or an unreachable registry: one line for the user, no traceback."""


def error_line(exc: Exception) -> str:
    """One line for the user from any exception (MLflow's carry the useful text in .message)."""
    message = getattr(exc, "message", None) or str(exc)
    return f"error: {type(exc).__name__}: {message.splitlines()[0] if message else ''}"


def _quiet_http() -> None:
    # before mlflow is imported: a registry that does not answer must fail in seconds, not retry for minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def resolve_tracking_uri(tracking_uri: str | None = None, root: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the flow's default sqlite:///<paths.root>/mlflow.db."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if root is None:
        from flows.config import compose

        cfg = compose([])
        if cfg.tracking.uri:
            return cfg.tracking.uri
        root = cfg.paths.root
    return f"sqlite:///{Path(root).expanduser().resolve() / 'mlflow.db'}"


def check_registry(uri: str) -> None:
    """Fail fast with one clear line when the store is missing or the server does not answer."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise RegistryError(f"no MLflow store at {path} (run the finetune flow first, or pass --tracking-uri)")
    elif uri.startswith(("http://", "https://")):
        problem = probe(uri)
        if problem and problem.startswith("answered HTTP"):
            raise RegistryError(f"the MLflow server at {uri} {problem} to /health")
        if problem:
            raise RegistryError(f"the MLflow server at {uri} does not answer ({problem})")


def connect(uri: str):
    """An MlflowClient on `uri`, after a quick probe."""
    _quiet_http()
    check_registry(uri)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"the registry refused the lookup of {name!r}: {exc.message}") from None
    known = sorted(m.name for m in client.search_registered_models())
    raise RegistryError(f"no registered model {name!r} (known: {', '.join(known) or 'none'})") from None


def get_version(client, name: str, version_or_alias: str):
    """A model version by number or alias, with an error that lists what exists."""
    from mlflow.exceptions import MlflowException

    model = _registered_model(client, name)
    try:
        if version_or_alias.isdigit():
            return client.get_model_version(name, version_or_alias)
        return client.get_model_version_by_alias(name, version_or_alias)
    except MlflowException:
        pass
    aliases = ", ".join(f"{a}->v{v}" for a, v in sorted(model.aliases.items())) or "none"
    what = "version" if version_or_alias.isdigit() else "alias"
    raise RegistryError(f"model {name!r} has no {what} {version_or_alias!r} (aliases: {aliases})") from None


def parse_model_uri(uri: str) -> tuple[str, str]:
    """models:/<name>@<alias> or models:/<name>/<version> -> (name, alias or version)."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"model={uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, _, ref = rest.rpartition("@")
    elif "/" in rest:
        name, _, ref = rest.rpartition("/")
    else:
        raise RegistryError(f"model={uri!r}: name the version or alias, e.g. models:/{rest}@champion")
    if not name or not ref:
        raise RegistryError(f"model={uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, ref


def _versions(client, name: str) -> list:
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def _metrics(version) -> dict[str, str]:
    return {k.removeprefix("metric."): v for k, v in sorted(version.tags.items()) if k.startswith("metric.")}


def previous_champion(version) -> str | None:
    """The champion that `version` replaced when it took champion, from its tags (None if unknown)."""
    tags = version.tags
    if tags.get("promoted_by") == "manual":
        previous = tags.get("promoted_from")
    elif tags.get("gate.decision") == "promoted":
        previous = tags.get("gate.champion_version")
    else:
        previous = None
    if previous in (None, "", "None", str(version.version)):
        return None
    return previous


def _move_champion(client, name: str, version: str, event: dict) -> None:
    client.set_registered_model_alias(name, CHAMPION, version)
    history = (champion_history(_registered_model(client, name)) + [event])[-HISTORY_KEEP:]
    client.set_registered_model_tag(name, CHAMPION_HISTORY, json.dumps(history, separators=(",", ":")))


def _current_champion(client, name: str) -> str | None:
    return _registered_model(client, name).aliases.get(CHAMPION)


# --- commands -------------------------------------------------------------------------------------------------


def cmd_list(client, name: str | None = None) -> str:
    models = [_registered_model(client, name)] if name else client.search_registered_models()
    if not models:
        return "no registered models"
    lines = []
    for model in sorted(models, key=lambda m: m.name):
        by_version: dict[str, list[str]] = {}
        for alias, v in model.aliases.items():
            by_version.setdefault(str(v), []).append(alias)
        lines.append(f"{model.name}")
        for v in _versions(client, model.name):
            metric = v.tags.get("gate.metric")
            value = v.tags.get(f"metric.{metric}") if metric else None
            lines.append(
                f"  v{v.version:<4} aliases: {','.join(sorted(by_version.get(str(v.version), []))) or '-':<20} "
                f"gate: {v.tags.get('gate.decision', '-'):<13}"
                + (f" {metric}={value}" if value is not None else "")
                + f"  created {time.strftime('%Y-%m-%d %H:%M', time.localtime(v.creation_timestamp / 1000))}"
            )
    return "\n".join(lines)


def cmd_show(client, name: str, version_or_alias: str = CHAMPION) -> str:
    version = get_version(client, name, version_or_alias)
    lines = [
        f"{name} v{version.version}",
        f"  aliases:  {', '.join(sorted(version.aliases)) or 'none'}",
        f"  source:   {version.source}",
        f"  run:      {version.run_id}",
        f"  gate:     {version.tags.get('gate.decision', 'none')} ({version.tags.get('gate.reason', '-')})",
    ]
    if version.tags.get("promoted_by"):
        lines.append(f"  promoted: by {version.tags['promoted_by']} from v{version.tags.get('promoted_from')} "
                     f"at {version.tags.get('promoted_at')}")
    lines.append("  metrics:")
    lines += [f"    {k:<24} {v}" for k, v in _metrics(version).items()] or ["    none"]
    lines.append("  tags:")
    lines += [f"    {k:<24} {v}" for k, v in sorted(version.tags.items()) if not k.startswith("metric.")]
    return "\n".join(lines)


def cmd_promote(client, name: str, version: str) -> str:
    target = get_version(client, name, version)
    previous = _current_champion(client, name)
    if previous == str(target.version):
        return f"{name} v{target.version} is already champion"
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for key, value in {"promoted_by": "manual", "promoted_from": str(previous), "promoted_at": now}.items():
        client.set_model_version_tag(name, target.version, key, value)
    _move_champion(client, name, str(target.version),
                   {"version": str(target.version), "from": previous, "by": "manual", "action": "promote", "at": now})
    return f"{name}: champion v{previous} -> v{target.version} (manual promotion)"


def cmd_rollback(client, name: str) -> str:
    current = _current_champion(client, name)
    if current is None:
        raise RegistryError(f"model {name!r} has no champion to roll back")
    previous = previous_champion(client.get_model_version(name, current))
    if previous is None:
        raise RegistryError(f"{name} v{current} replaced no earlier champion: nothing to roll back to "
                            f"(promote a version by hand with `promote {name} <version>`)")
    get_version(client, name, previous)  # still there?
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _move_champion(client, name, previous,
                   {"version": previous, "from": current, "by": "manual", "action": "rollback", "at": now})
    return f"{name}: champion v{current} -> v{previous} (rollback)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.registry", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, "
                                               "else sqlite:///<paths.root>/mlflow.db)")
    parser.add_argument("--root", help="paths.root of the flow, for the default SQLite store")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="registered models with their versions and aliases")
    listing.add_argument("name", nargs="?")
    show = commands.add_parser("show", help="one version (default: the champion)")
    show.add_argument("name")
    show.add_argument("version", nargs="?", default=CHAMPION, help="a version number or an alias (default champion)")
    promote = commands.add_parser("promote", help="move champion to a version by hand")
    promote.add_argument("name")
    promote.add_argument("version")
    rollback = commands.add_parser("rollback", help="move champion back to the previous champion")
    rollback.add_argument("name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        client = connect(resolve_tracking_uri(args.tracking_uri, args.root))
        if args.command == "list":
            print(cmd_list(client, args.name))
        elif args.command == "show":
            print(cmd_show(client, args.name, args.version))
        elif args.command == "promote":
            print(cmd_promote(client, args.name, args.version))
        else:
            print(cmd_rollback(client, args.name))
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a server error mid-command: one line, not a traceback
        print(error_line(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
