"""A small Hugging Face Hub stand-in for tests: a stdlib HTTP server on 127.0.0.1 that speaks the routes
`huggingface_hub` uses to create repos and branches, commit files and download them back.

Repos live in memory as git-like histories: every commit is a full snapshot `{path: bytes}` with a 40-hex id, and
branches point at commits, so `revision=` may name a branch or a commit id. Files are always committed inline
("regular" upload mode): no LFS or Xet transfer is involved. Writes need an `Authorization: Bearer ...` header
(any token is accepted); reads are anonymous. Requests to routes it does not know are answered 404 and kept in
`unknown_requests`, so a test can tell a missing route from a missing file.

Run it alone with `python tests/hub_server.py [--port N]` and point `HF_ENDPOINT` at the printed address.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

USER = "tester"
DEFAULT_BRANCH = "main"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")
_API_REPO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<rest>.*))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")


def _metadata_errors(card: str) -> list[dict]:
    """The one card check the Hub is known to make that matters here: `base_model` must name Hub models, not local
    paths (transformers#33922, peft#2124: a card whose base_model is a path is refused with 400)."""
    if not card.startswith("---"):
        return []
    block = card[3 : card.find("\n---", 3)].splitlines()
    values: list[str] = []
    for i, line in enumerate(block):
        if match := re.match(r"^base_model:\s*(.*)$", line):
            if match[1].strip():
                values.append(match[1])
            else:
                for item in block[i + 1 :]:
                    if not item.lstrip().startswith("- "):
                        break
                    values.append(item.lstrip()[2:])
    errors = []
    for value in (v.strip().strip("'\"") for v in values):
        namespace, _, name = value.rpartition("/")
        valid = _NAME.match(name) and (not namespace or _NAME.match(namespace)) and ".." not in value
        if not valid or "--" in value:
            errors.append(
                {"message": f'"base_model" with value "{value}" is not valid. Use a model id from hf.co/models.'}
            )
    return errors


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    id: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> Commit:
        parent = self.branches.get(branch)
        seed = f"{self.id}\0{parent}\0{message}\0{time.time_ns()}\0{len(self.commits)}".encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), files, message, parent)
        self.commits[commit.id] = commit
        self.branches[branch] = commit.id
        return commit

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if _COMMIT_ID.match(revision):
            return self.commits.get(revision)
        return None


class HubState:
    """Everything the server knows, behind one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.unknown_requests: list[str] = []
        self.requests: list[str] = []


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **body: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # --- plumbing ---------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
        with state.lock:
            state.requests.append(f"{method} {url.path}")
        try:
            status, headers, payload = self._route(method, url.path, parse_qs(url.query), body)
        except HubError as error:
            status, payload = error.status, json.dumps({"error": error.message, **error.body}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def _route(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if method == "POST" and path == "/api/repos/create":
            return self._json(self._create_repo(json.loads(body or b"{}")))
        if method == "GET" and path == "/api/whoami-v2":
            self._require_token()
            return self._json({"type": "user", "name": USER, "fullname": USER, "orgs": [], "auth": {}})
        if method == "POST" and path == "/api/validate-yaml":
            errors = _metadata_errors(json.loads(body or b"{}").get("content", ""))
            return self._json({"errors": errors, "warnings": []}, status=400 if errors else 200)
        if method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry
            return self._json({"standardEnvVars": [], "harnesses": {}})
        if match := _API_REPO.match(path):
            return self._repo_api(method, match["repo"], match["rest"] or "", query, body)
        if (match := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
            return self._resolve(match["repo"], unquote(match["revision"]), unquote(match["path"]))
        with self.server.state.lock:
            self.server.state.unknown_requests.append(f"{method} {path}")
        raise HubError(404, f"the test Hub has no route {method} {path}")

    @staticmethod
    def _json(data: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(data).encode()

    def _require_token(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid username or password.")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.server.state.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # --- routes -----------------------------------------------------------------------------------------------

    def _create_repo(self, payload: dict) -> dict:
        self._require_token()
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, "the test Hub only hosts model repos")
        name, namespace = payload.get("name") or "", payload.get("organization") or USER
        if not (_NAME.match(name) and _NAME.match(namespace)):
            raise HubError(400, f"invalid repo name {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.server.url}/{repo_id}"
        with self.server.state.lock:
            if repo_id in self.server.state.repos:
                raise HubError(409, "You already created this model repo", url=url)
            repo = Repo(repo_id, private=payload.get("visibility") == "private")
            repo.commit(
                DEFAULT_BRANCH, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "init"
            )
            self.server.state.repos[repo_id] = repo
        return {"url": url, "name": repo_id, "id": repo_id}

    def _repo_api(self, method: str, repo_id: str, rest: str, query: dict, body: bytes):
        state = self.server.state
        parts = [unquote(p) for p in rest.split("/")] if rest else []
        with state.lock:
            repo = self._repo(repo_id)
            if method == "GET" and not parts:
                return self._json(self._info(repo, self._commit(repo, DEFAULT_BRANCH)))
            if method == "GET" and parts[0] == "revision" and len(parts) == 2:
                return self._json(self._info(repo, self._commit(repo, parts[1])))
            if method == "GET" and parts[0] == "tree" and len(parts) >= 2:
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return self._json(self._tree(self._commit(repo, parts[1]), "/".join(parts[2:]), recursive))
            if method == "GET" and parts == ["refs"]:
                branches = [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in sorted(repo.branches.items())
                ]
                return self._json({"branches": branches, "tags": [], "converts": []})
            if method == "POST" and parts[0] == "preupload" and len(parts) == 2:
                self._require_token()
                self._commit(repo, parts[1])
                files = json.loads(body)["files"]
                return self._json(
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                )
            if method == "POST" and parts[0] == "commit" and len(parts) == 2:
                self._require_token()
                if query.get("create_pr"):
                    raise HubError(400, "the test Hub does not open pull requests")
                return self._json(self._apply_commit(repo, parts[1], body))
            if method == "POST" and parts[0] == "branch" and len(parts) == 2:
                self._require_token()
                payload = json.loads(body or b"{}")
                if parts[1] in repo.branches:
                    raise HubError(409, f"Reference refs/heads/{parts[1]} already exists")
                start = self._commit(repo, payload.get("startingPoint") or DEFAULT_BRANCH)
                repo.branches[parts[1]] = start.id
                return self._json({})
        with state.lock:
            state.unknown_requests.append(f"{method} /api/models/{repo_id}/{rest}")
        raise HubError(404, f"the test Hub has no route {method} /api/models/{repo_id}/{rest}")

    def _info(self, repo: Repo, commit: Commit) -> dict:
        return {
            "id": repo.id,
            "modelId": repo.id,
            "sha": commit.id,
            "private": repo.private,
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            "tags": [],
            "downloads": 0,
            "likes": 0,
        }

    @staticmethod
    def _tree(commit: Commit, folder: str, recursive: bool) -> list[dict]:
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, content in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            head, _, tail = path[len(prefix) :].partition("/")
            if tail and not recursive:
                entries.setdefault(prefix + head, {"type": "directory", "path": prefix + head, "oid": "0" * 40})
                continue
            entries[path] = {"type": "file", "path": path, "size": len(content), "oid": git_blob_id(content)}
        if prefix and not entries:
            raise HubError(404, f"{folder} does not exist", "EntryNotFound")
        return list(entries.values())

    def _apply_commit(self, repo: Repo, revision: str, body: bytes) -> dict:
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        files = dict(repo.commits[repo.branches[revision]].files)
        message = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary") or ""
                parent = value.get("parentCommit")
                if parent and parent != repo.branches[revision]:
                    raise HubError(412, f"parent commit {parent} is not the head of {revision}")
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"{value['path']} does not exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"the test Hub only takes inline files; got a {key!r} operation")
        commit = repo.commit(revision, files, message)
        return {
            "commitUrl": f"{self.server.url}/{repo.id}/commit/{commit.id}",
            "commitOid": commit.id,
            "success": True,
            "pullRequestUrl": None,
        }

    def _resolve(self, repo_id: str, revision: str, path: str):
        with self.server.state.lock:
            commit = self._commit(self._repo(repo_id), revision)
            content = commit.files.get(path)
        if content is None:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound")
        status, start = 200, 0
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit.id,
            "ETag": f'"{git_blob_id(content)}"',
        }
        if match := re.match(r"bytes=(\d+)-$", self.headers.get("Range", "")):
            start = int(match[1])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        return status, headers, content[start:]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    url: str


class HubServer:
    """The test Hub on 127.0.0.1, in a background thread: `with HubServer() as hub: ... hub.url ...`."""

    def __init__(self, port: int = 0) -> None:
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.state = HubState()
        self._server.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-hub", daemon=True)

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def state(self) -> HubState:
        return self._server.state

    def files(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> dict[str, bytes]:
        """The files of `repo_id` at `revision` (branch or commit id)."""
        with self.state.lock:
            repo = self.state.repos[repo_id]
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(f"{repo_id} has no revision {revision!r}")
            return dict(commit.files)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with HubServer(args.port) as hub:
        print(f"HF_ENDPOINT={hub.url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
