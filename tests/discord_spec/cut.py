"""Cut the part of Discord's OpenAPI description that the fake serves into ``openapi.json`` here.

Run from the repository root with the full spec's path (Discord's discord/discord-api-spec, specs/openapi.json):
``python tests/discord_spec/cut.py ../shared/discord-api-spec/openapi.json``. Re-run it when the fake gains a
route, so the vendored copy stays small and its provenance stays plain.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
# Every (path, method) the fake answers; tests/discord_spec/validate.py fails on a response to any other.
ROUTES = {
    "/users/@me": ["get"],
    "/oauth2/applications/@me": ["get"],
    "/gateway": ["get"],
    "/gateway/bot": ["get"],
    "/applications/{application_id}/commands": ["get", "put"],
    "/applications/{application_id}/guilds/{guild_id}/commands": ["put"],
    "/channels/{channel_id}": ["get"],
    "/channels/{channel_id}/messages": ["get", "post"],
    "/channels/{channel_id}/messages/{message_id}": ["get", "patch", "delete"],
    "/channels/{channel_id}/typing": ["post"],
    "/channels/{channel_id}/webhooks": ["get", "post"],
    "/guilds/{guild_id}/webhooks": ["get"],
    "/users/@me/channels": ["post"],
    "/webhooks/{webhook_id}/{webhook_token}": ["post"],
    "/webhooks/{webhook_id}/{webhook_token}/messages/{message_id}": ["get", "patch"],
    "/webhooks/{webhook_id}/{webhook_token}/messages/@original": ["get", "patch"],
    "/interactions/{interaction_id}/{interaction_token}/callback": ["post"],
}


def refs(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


def cut(spec: dict) -> dict:
    paths = {p: {m: {"responses": spec["paths"][p][m]["responses"]} for m in methods} for p, methods in ROUTES.items()}
    components: dict[str, dict] = {}
    todo, seen = refs(paths), set()
    while todo:
        ref = todo.pop()
        seen.add(ref)
        _, _, kind, name = ref.split("/")
        node = spec["components"][kind][name]
        components.setdefault(kind, {})[name] = node
        todo |= refs(node) - seen
    return {"openapi": spec["openapi"], "info": spec["info"], "paths": paths,
            "components": {k: dict(sorted(v.items())) for k, v in sorted(components.items())}}


if __name__ == "__main__":
    full = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    (HERE / "openapi.json").write_text(json.dumps(cut(full), indent=1, sort_keys=False) + "\n", encoding="utf-8")
