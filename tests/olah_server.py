"""A real Hub-compatible server on loopback for the download tests: olah, serving local git repos.

``OlahHub(tmp).add_repo("org/name", folder)`` commits a folder to a plain git repo that olah mirrors;
``start()`` runs olah (from .venv-olah, see tools/setup_olah.sh) on a free 127.0.0.1 port with its
upstream pointed at a closed loopback port, so nothing leaves the machine. Offline, olah resolves
branch names from its cache, which ``add_repo`` seeds as olah itself would have written it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLAH = ROOT / ".venv-olah" / "bin" / "olah-cli"


def available() -> bool:
    return OLAH.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(cwd: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout.strip()


class OlahHub:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.mirrors = self.dir / "mirrors"
        self.repos = self.dir / "repos"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_repo(self, repo_id: str, folder: Path, branch: str = "main") -> str:
        """Commit ``folder``'s files as repo ``repo_id``; returns the commit sha."""
        org, name = repo_id.split("/")
        g = self.mirrors / "models" / org / name
        if not g.exists():
            g.mkdir(parents=True)
            git(g, "init", "-q", "-b", branch)
        for p in Path(folder).rglob("*"):
            if p.is_file():
                dst = g / p.relative_to(folder)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dst)
        git(g, "add", "-A")
        git(g, "commit", "-q", "-m", "upload")
        sha = git(g, "rev-parse", "HEAD")
        rev = self.repos / "api" / "models" / org / name / "revision"
        for r in (branch, sha):
            d = rev / r
            d.mkdir(parents=True, exist_ok=True)
            (d / "resolved_commit.json").write_text(json.dumps({"status_code": 200, "headers": {}, "cached_at": time.time()}))
            (d / "resolved_commit.json.body").write_text(sha)
        (rev / sha / "meta_head.json").write_text(json.dumps({"sha": sha, "lastModified": "2026-11-22T00:00:00.000Z"}))
        return sha

    def start(self) -> None:
        closed = free_port()  # nothing listens there: olah's upstream is unreachable by construction
        cfg = self.dir / "olah.toml"
        cfg.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{self.repos}"\nmirrors-path = ["{self.mirrors}"]\n'
            'hf-scheme = "http"\n'
            f'hf-netloc = "127.0.0.1:{closed}"\nhf-lfs-netloc = "127.0.0.1:{closed}"\n'
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "127.0.0.1:{self.port}"\nmirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            "[accessibility]\noffline = true\n"
        )
        self.log = open(self.dir / "olah.log", "w")
        self.proc = subprocess.Popen([str(OLAH), "-c", str(cfg)], cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("olah exited:\n" + (self.dir / "olah.log").read_text()[-3000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("olah did not start in 60 s:\n" + (self.dir / "olah.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc:
            self.log.close()
