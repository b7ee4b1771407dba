"""A loopback HTTP server speaking the Hub endpoints that huggingface_hub's upload path uses, so push
can be tested through the real client. No public server accepts uploads offline.

Implemented: POST /api/repos/create, POST /api/models/{repo}/branch/{branch},
POST /api/models/{repo}/preupload/{rev}, POST /{repo}.git/info/lfs/objects/batch, PUT /lfs/{oid},
POST /api/models/{repo}/commit/{rev} (NDJSON: header, file, lfsFile), POST /api/validate-yaml,
GET /api/whoami-v2; for downloads, GET /api/{datasets,models}/{repo}[/revision/{rev}], its /tree/{rev}, and
GET/HEAD [/datasets]/{repo}/resolve/{rev}/{path} of the datasets in ``state.datasets`` and of the model
repos pushed here (so a pushed card's snippet can load what was pushed; a test can make datasets
hostile: a planted ETag or commit sha, sibling names, a body trickled a byte at a time).
Tokens map to user names; a repo outside the caller's namespace answers 403, a missing or unknown
token 401. ``state.fail_commits`` makes commits fail with HTTP 500, to test that a re-run resumes.
This server speaks LFS, not xet. huggingface_hub 2.4 does not ask the server whether to use xet: it
uploads through xet whenever the hf_xet package is installed (``_commit_api._upload_files`` ->
``is_xet_available()``), and only HF_HUB_DISABLE_XET=1 turns that off, so clients set it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubState:
    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens  # token -> user
        self.repos: dict[str, dict] = {}  # repo_id -> {"private", "branches": {name: {path: bytes}}, "commits": [...], "prs": [...]}
        self.lfs: dict[str, bytes] = {}
        self.validated_cards: list[str] = []
        self.lfs_puts: list[str] = []  # oids, in the order their bytes arrived
        self.fail_commits = 0  # answer this many commit requests with HTTP 500 (an upload cut off before its commit)
        self.datasets: dict[str, dict] = {}  # repo_id -> {"files": {path: bytes}, "sha": ...}, served for download
        self.lock = threading.Lock()


def make_handler(state: HubState):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _json(self, code: int, obj, headers=None):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _user(self):
            auth = self.headers.get("Authorization", "")
            tok = auth[7:] if auth.startswith("Bearer ") else None
            return state.tokens.get(tok) if tok else None

        def _auth(self, repo_id: str | None = None):
            user = self._user()
            if user is None:
                self._json(401, {"error": "Invalid credentials"})
                return None
            if repo_id is not None and repo_id.split("/")[0] != user:
                self._json(403, {"error": f"You don't have the rights to write to {repo_id}"})
                return None
            return user

        def _repo(self, repo_id: str):
            r = state.repos.get(repo_id)
            if r is None:
                self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            return r

        def do_GET(self):
            if self.path.startswith("/api/whoami"):
                user = self._auth()
                if user:
                    self._json(200, {"name": user, "type": "user", "auth": {"accessToken": {"role": "write"}}})
                return
            self._download(body=True)

        def do_HEAD(self):
            self._download(body=False)

        def _served(self, kind: str | None, repo_id: str, rev: str | None) -> dict | None:
            """A dataset of ``state.datasets``, or a model repo pushed here (its branch ``rev``, else main)."""
            if kind in ("datasets", "datasets/"):
                return state.datasets.get(repo_id)
            repo = state.repos.get(repo_id)
            if repo is None:
                return None
            files = repo["branches"].get((rev or "main").replace("%2F", "/")) or repo["branches"]["main"]
            return {"files": files, "sha": hashlib.sha1(json.dumps(sorted(files)).encode() + str(len(repo["commits"])).encode()).hexdigest()}

        def _download(self, body: bool):
            """Downloads of datasets and of the model repos pushed here: repo info, tree and resolve, with
            the hostile answers a test sets in ``state.datasets[repo_id]`` ("sha", "etag", "commit"
            header, extra "siblings", "trickle")."""
            path = self.path.split("?")[0]
            m = re.fullmatch(r"/api/(datasets|models)/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            ds = self._served(m.group(1), m.group(2), m.group(3)) if m else None
            if ds is not None:
                names = sorted(ds["files"]) + ds.get("siblings", [])
                return self._json(200, {"id": m.group(2), "sha": ds["sha"], "siblings": [{"rfilename": n} for n in names]})
            m = re.fullmatch(r"/api/(datasets|models)/([^/]+/[^/]+)/tree/([^/]+)", path)  # what snapshot_download lists
            ds = self._served(m.group(1), m.group(2), m.group(3)) if m else None
            if ds is not None:
                names = sorted(ds["files"]) + ds.get("siblings", [])
                return self._json(200, [{"type": "file", "path": n, "size": len(ds["files"].get(n, b"")), "oid": "0" * 40} for n in names])
            m = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            ds = self._served(m.group(1), m.group(2), m.group(3)) if m else None
            m = m and re.fullmatch(r"/(?:datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if ds is None or m.group(3) not in ds["files"]:
                return self._json(404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"})
            data = ds["files"][m.group(3)]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", '"%s"' % ds.get("etag", hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()))
            self.send_header("X-Repo-Commit", ds.get("commit", ds["sha"]))
            self.end_headers()
            if body:
                for i in range(len(data)) if ds.get("trickle") else [None]:
                    self.wfile.write(data if i is None else data[i:i + 1])
                    self.wfile.flush()
                    if i is not None:
                        time.sleep(ds["trickle"])

        def do_PUT(self):
            m = re.fullmatch(r"/lfs/([0-9a-f]{64})", self.path)
            if not m:
                return self._json(404, {"error": "not found"})
            data = self._body()
            if hashlib.sha256(data).hexdigest() != m.group(1):
                return self._json(400, {"error": "sha256 mismatch"})
            with state.lock:
                state.lfs[m.group(1)] = data
                state.lfs_puts.append(m.group(1))
            self._json(200, {})

        def do_POST(self):
            path = self.path.split("?")[0]
            query = self.path.split("?")[1] if "?" in self.path else ""
            if path == "/api/validate-yaml":  # the Hub checks a card's metadata before the commit
                content = json.loads(self._body()).get("content", "")
                errors = []
                if not content.startswith("---"):
                    errors.append({"message": "no YAML front matter"})
                rel = re.search(r"^base_model_relation: \"?(\w+)", content, re.MULTILINE)
                if rel and rel.group(1) not in ("adapter", "merge", "quantized", "finetune"):
                    errors.append({"message": f"base_model_relation {rel.group(1)!r} is not allowed"})
                state.validated_cards.append(content)
                return self._json(400 if errors else 200, {"errors": errors, "warnings": []})
            if path == "/api/repos/create":
                user = self._auth()
                if not user:
                    return
                body = json.loads(self._body() or b"{}")
                ns = body.get("organization") or user
                repo_id = f"{ns}/{body['name']}"
                if ns != user:
                    return self._json(403, {"error": f"You don't have the rights to create a model under the namespace {ns}"})
                with state.lock:
                    if repo_id in state.repos:
                        return self._json(409, {"error": "You already created this model repo", "url": f"http://{self.headers['Host']}/{repo_id}"})
                    state.repos[repo_id] = {"private": bool(body.get("private")) or body.get("visibility") == "private", "branches": {"main": {}}, "commits": [], "prs": []}
                return self._json(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path)
            if m:
                if not self._auth(m.group(1)) or self._repo(m.group(1)) is None:
                    return
                with state.lock:
                    br = state.repos[m.group(1)]["branches"]
                    if m.group(2) in br:
                        return self._json(409, {"error": "Reference already exists"})
                    br[m.group(2)] = dict(br["main"])
                return self._json(200, {})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
            if m:
                if not self._auth(m.group(1)) or self._repo(m.group(1)) is None:
                    return
                files = json.loads(self._body())["files"]
                out = [{"path": f["path"], "uploadMode": "lfs" if f["size"] > 4096 or f["path"].endswith(".safetensors") else "regular",
                        "shouldIgnore": False} for f in files]
                return self._json(200, {"files": out, "commitOid": "0" * 40})
            m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if m:
                if not self._auth(m.group(1)):
                    return
                objs = []
                for o in json.loads(self._body())["objects"]:
                    entry = {"oid": o["oid"], "size": o["size"]}
                    if o["oid"] not in state.lfs:
                        entry["actions"] = {"upload": {"href": f"http://{self.headers['Host']}/lfs/{o['oid']}"}}
                    objs.append(entry)
                return self._json(200, {"transfer": "basic", "objects": objs})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
            if m:
                repo_id, rev = m.group(1), m.group(2)
                if not self._auth(repo_id) or self._repo(repo_id) is None:
                    return
                lines = [json.loads(l) for l in self._body().decode().splitlines() if l.strip()]
                with state.lock:
                    if state.fail_commits > 0:
                        state.fail_commits -= 1
                        return self._json(500, {"error": "Internal Error (injected by the test)"})
                files, summary = {}, ""
                for line in lines:
                    k, v = line["key"], line["value"]
                    if k == "header":
                        summary = v.get("summary", "")
                    elif k == "file":
                        files[v["path"]] = base64.b64decode(v["content"])
                    elif k == "lfsFile":
                        if v["oid"] not in state.lfs:
                            return self._json(400, {"error": f"LFS object {v['oid']} was never uploaded"})
                        files[v["path"]] = state.lfs[v["oid"]]
                sha = hashlib.sha1(json.dumps(sorted(files), default=str).encode() + str(len(state.repos[repo_id]["commits"])).encode()).hexdigest()
                with state.lock:
                    repo = state.repos[repo_id]
                    if "create_pr=1" in query:
                        repo["prs"].append({"files": files, "summary": summary})
                        num = len(repo["prs"])
                        return self._json(200, {"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{sha}", "commitOid": sha,
                                                "pullRequestUrl": f"http://{self.headers['Host']}/{repo_id}/discussions/{num}"})
                    branch = repo["branches"].setdefault(rev.replace("%2F", "/"), {})
                    branch.update(files)
                    repo["commits"].append({"revision": rev, "summary": summary, "files": sorted(files)})
                return self._json(200, {"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{sha}", "commitOid": sha})
            self._json(404, {"error": "not found"})

    return H


class LoopbackHub:
    def __init__(self, tokens: dict[str, str]):
        self.state = HubState(tokens)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.server.shutdown()
        self.server.server_close()
