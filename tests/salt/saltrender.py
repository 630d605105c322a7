"""Compile the chatmail formula and render every managed file, without applying anything.

Run with the Salt venv's Python (Salt is not a dependency of the project venv):

    salt-venv/bin/python tests/salt/saltrender.py --config-dir DIR --out OUT

DIR holds a masterless ``minion`` config (grains, pillar_roots, file_roots). The
result is ``OUT/index.json``::

    {"map": <the merged chatmail map>,
     "states": <state.show_sls chatmail>,
     "files": {"<path on the relay>": {"id": state id, "rendered": path under OUT,
                                       "check_cmd": str|null, "mode": str|null}}}

Templates are rendered by ``file.get_managed``, the function file.managed itself uses,
so the per-state ``context`` and ``defaults`` apply exactly as on a relay.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import salt.client
import salt.config

MAP_DUMP_TEMPLATE = (
    '{%- from "chatmail/map.jinja" import chatmail with context -%}{{ chatmail | json }}'
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config-dir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--map-template-dir",
        required=True,
        type=Path,
        help="a file_roots directory where the map dump template goes",
    )
    parser.add_argument(
        "--standalone",
        default="",
        help="comma-separated sub-states to compile alone (errors go to the index)",
    )
    args = parser.parse_args()

    (args.map_template_dir / "chatmail_test").mkdir(parents=True, exist_ok=True)
    (args.map_template_dir / "chatmail_test" / "map.json.jinja").write_text(MAP_DUMP_TEMPLATE)

    opts = salt.config.minion_config(str(args.config_dir / "minion"))
    opts["file_client"] = "local"
    caller = salt.client.Caller(mopts=opts)

    states = caller.cmd("state.show_sls", "chatmail")
    if not isinstance(states, dict):
        # A render error comes back as a list of messages.
        print(json.dumps({"error": states}), file=sys.stderr)
        return 2

    map_out = args.out / "map.json"
    map_out.parent.mkdir(parents=True, exist_ok=True)
    rendered_map = caller.cmd(
        "cp.get_template", "salt://chatmail_test/map.json.jinja", str(map_out)
    )
    if not rendered_map:
        print(json.dumps({"error": "map dump failed to render"}), file=sys.stderr)
        return 2
    chatmail_map = json.loads(map_out.read_text())

    files: dict[str, dict] = {}
    errors: list[str] = []
    for state_id, body in states.items():
        if not isinstance(body, dict) or "file" not in body:
            continue
        args_list = body["file"]
        if "managed" not in args_list:
            continue
        kwargs: dict = {}
        for item in args_list:
            if isinstance(item, dict):
                kwargs.update(item)
        name = kwargs.get("name", state_id)
        target = args.out / "files" / name.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if str(kwargs.get("source", "")).startswith(("http://", "https://")):
            continue  # a download (e.g. upstream's Dovecot .debs), not a file of the formula
        if "contents" in kwargs:
            contents = kwargs["contents"]
            text = contents if isinstance(contents, str) else "\n".join(map(str, contents))
            target.write_text(text if text.endswith("\n") else text + "\n")
        elif kwargs.get("source") and not kwargs.get("template"):
            cached = caller.cmd("cp.cache_file", kwargs["source"])
            if not cached:
                errors.append(f"{state_id}: {kwargs['source']} not found")
                continue
            shutil.copyfile(cached, target)
        elif kwargs.get("source"):
            sfn, _, comment = caller.cmd(
                "file.get_managed",
                name,
                kwargs.get("template"),
                kwargs["source"],
                kwargs.get("source_hash", ""),
                kwargs.get("source_hash_name"),
                None,
                None,
                kwargs.get("mode"),
                None,
                "base",
                kwargs.get("context"),
                kwargs.get("defaults"),
            )
            if not sfn:
                errors.append(f"{state_id}: {comment}")
                continue
            shutil.copyfile(sfn, target)
        else:
            # file.managed without content only manages metadata (e.g. replace: False)
            continue
        files[name] = {
            "id": state_id,
            "rendered": str(target),
            "check_cmd": kwargs.get("check_cmd"),
            "mode": kwargs.get("mode"),
        }
    standalone = {}
    for sls in filter(None, args.standalone.split(",")):
        alone = caller.cmd("state.show_sls", sls)
        standalone[sls] = sorted(alone) if isinstance(alone, dict) else {"error": alone}
    index = {
        "map": chatmail_map,
        "states": states,
        "files": files,
        "errors": errors,
        "standalone": standalone,
    }
    (args.out / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
