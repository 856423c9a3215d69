"""A stand-in for the Hugging Face hub for tests: answers, on the loopback address only, the endpoints that
huggingface_hub's snapshot_download uses (repository info by revision, the file tree, HEAD and GET of
/{repo}/resolve/{revision}/{file}), from repositories held in memory. Started and stopped by the tests. Also
`cache_repo`, a repository laid out in a hub cache as huggingface_hub lays it out."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    """repos: repo id -> {"refs": {name: commit}, "files": {name: bytes}}; `requests` records what was asked."""

    def __init__(self, repos: dict[str, dict]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def _commit(self, repo: dict, revision: str) -> str | None:
        return repo["refs"].get(revision, revision if revision in repo["refs"].values() else None)

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, value) -> None:
                self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

            def _missing(self, code: str) -> None:
                self._send(404, json.dumps({"error": code}).encode(), {"X-Error-Code": code,
                                                                      "Content-Type": "application/json"})

            def _route(self) -> None:
                hub.requests.append((self.command, self.path))
                parts = unquote(urlparse(self.path).path).strip("/").split("/")
                api = parts[:2] == ["api", "models"]
                repo_id = "/".join(parts[2:4] if api else parts[:2])
                repo = hub.repos.get(repo_id)
                rest = parts[4:] if api else parts[2:]
                if repo is None or len(rest) < 2:
                    return self._missing("RepoNotFound")
                commit = hub._commit(repo, rest[1])
                if commit is None:
                    return self._missing("RevisionNotFound")
                if api and rest[0] == "revision":
                    return self._json({"id": repo_id, "sha": commit, "private": False,
                                       "siblings": [{"rfilename": name} for name in repo["files"]]})
                if api and rest[0] == "tree":
                    return self._json([{"type": "file", "path": name, "size": len(data),
                                        "oid": hashlib.sha1(data).hexdigest()} for name, data in repo["files"].items()])
                name = "/".join(rest[2:])
                if api or rest[0] != "resolve" or name not in repo["files"]:
                    return self._missing("EntryNotFound")
                data = repo["files"][name]
                self._send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                       "Content-Type": "application/octet-stream"})

            def do_GET(self) -> None:
                self._route()

            def do_HEAD(self) -> None:
                self._route()

        return Handler


def cache_repo(cache: Path, repo_id: str, source: Path, refs: dict[str, str]) -> dict[str, str]:
    """`source`'s files as a hub cache repository: each file a blob named by its hash, each commit a snapshot of
    links into blobs/, each ref a file holding its commit. refs: name -> commit (all snapshots hold the files)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for name, commit in refs.items():
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            if not blob.exists():
                shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
        (repo / "refs" / name).write_text(commit)
    return refs
