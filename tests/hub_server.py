"""A tiny Hugging Face Hub-compatible HTTP server for tests, on 127.0.0.1 only.

It serves what ``huggingface_hub`` 2.x calls for ``hf_hub_download`` and ``HfApi.upload_folder``:

- ``HEAD``/``GET /{org}/{name}/resolve/{revision}/{filename}``: the file, with ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length`` (no ``X-Xet-Hash``, so the client downloads over plain HTTP); a missing repo, revision or file
  is a 404 with the ``X-Error-Code`` the client maps to its exceptions (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``);
- ``POST /api/repos/create``, ``POST /api/models/{org}/{name}/branch/{branch}``, ``POST /api/validate-yaml``,
  ``POST /api/models/{org}/{name}/preupload/{revision}`` (every file "regular", i.e. sent inline, no LFS or Xet) and
  ``POST /api/models/{org}/{name}/commit/{revision}`` (NDJSON with base64 file contents).

Anything else is a 404. Requests are recorded in ``requests`` as ``(method, path, headers)``. HTTP/1.0 (one
request per connection), so once ``stop()`` returns nothing more is served.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_RESOLVE = re.compile(rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)")
_API = re.compile(rf"/api/models/{_REPO}/(?P<action>preupload|commit|branch)/(?P<revision>[^/]+)")


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit hash -> {filename: content}
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit hash

    def commit_of(self, revision: str) -> str | None:
        return self.branches.get(revision) or (revision if revision in self.commits else None)


class HubServer:
    """``add_commit`` repos and files, ``start()``, point ``HF_ENDPOINT`` at ``url``, ``stop()``."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self._http: ThreadingHTTPServer | None = None

    # ---- content ---------------------------------------------------------------------------------------------
    def add_commit(self, repo_id: str, files: dict[str, bytes], branch: str | None = "main") -> str:
        """A new commit of ``files`` on top of ``branch``'s head (which moves to it); returns its hash."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo())
            parent = repo.branches.get(branch) if branch else None
            tree = {**repo.commits.get(parent, {}), **files} if parent else dict(files)
            digest = hashlib.sha1(f"{repo_id} {len(repo.commits)} {parent}".encode())
            for name in sorted(tree):
                digest.update(name.encode() + hashlib.sha256(tree[name]).digest())
            commit = digest.hexdigest()
            repo.commits[commit] = tree
            if branch:
                repo.branches[branch] = commit
            return commit

    def paths(self, method: str | None = None) -> list[str]:
        return [path for m, path, _ in self.requests if method in (None, m)]

    # ---- lifecycle -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._http is not None, "server not started"
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


def _handler_class(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._resolve(send_body=False)

        def do_GET(self) -> None:
            self._resolve(send_body=True)

        def do_POST(self) -> None:
            path = self._record()
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            if path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            match = _API.fullmatch(path)
            if not match or match["repo"] not in hub.repos:
                return self._error(404, "RepoNotFound")
            repo, revision = hub.repos[match["repo"]], match["revision"]
            if match["action"] == "branch":
                return self._create_branch(repo, revision)
            if repo.commit_of(revision) is None and repo.commits:
                return self._error(404, "RevisionNotFound")
            if match["action"] == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            self._commit(match["repo"], revision, body)

        # ---- endpoints ---------------------------------------------------------------------------------------
        def _resolve(self, send_body: bool) -> None:
            match = _RESOLVE.fullmatch(self._record())
            if not match or match["repo"] not in hub.repos:
                return self._error(404, "RepoNotFound")
            repo = hub.repos[match["repo"]]
            commit = repo.commit_of(match["revision"])
            if commit is None:
                return self._error(404, "RevisionNotFound")
            content = repo.commits[commit].get(match["filename"])
            if content is None:
                return self._error(404, "EntryNotFound", {"X-Repo-Commit": commit})
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if send_body:
                self.wfile.write(content)

        def _create_repo(self, payload: dict) -> None:
            repo_id = f"{payload['organization']}/{payload['name']}"
            with hub.lock:
                exists = repo_id in hub.repos
                hub.repos.setdefault(repo_id, Repo())
            self._json(409 if exists else 200, {"url": f"{hub.url}/{repo_id}"})  # the Hub sends the url on 409 too

        def _create_branch(self, repo: Repo, branch: str) -> None:
            with hub.lock:
                if branch in repo.branches:
                    return self._json(409, {"error": "Reference already exists"})
                if "main" in repo.branches:  # an empty repo gets the branch with its first commit
                    repo.branches[branch] = repo.branches["main"]
            self._json(200, {})

        def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                     for item in lines if item["key"] == "file"}
            commit = hub.add_commit(repo_id, files, branch=revision)
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{commit}", "commitOid": commit})

        # ---- helpers -----------------------------------------------------------------------------------------
        def _record(self) -> str:
            path = unquote(urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((self.command, path, dict(self.headers)))
            return path

        def _json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
