"""A local stand-in for a Hugging Face hub mirror (what HF_ENDPOINT points at), serving one folder.

It answers the few routes that `huggingface_hub.snapshot_download` uses: the repository's
file list and tree, and each file by HEAD (size, commit, etag) and GET. It records the files served,
so a test can tell a download from a cache hit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse, Response

from local_server import LocalServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(LocalServer):
    """Serves `folder` as the repository `repo_id` on 127.0.0.1."""

    def __init__(self, repo_id: str, folder: Path):
        self.repo_id, self.folder = repo_id, Path(folder)
        self.downloads: list[str] = []
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _file(self, org: str, name: str, filename: str) -> Path:
        path = self.folder / filename
        if f"{org}/{name}" != self.repo_id or not path.is_file():
            raise HTTPException(404, "Entry not found")
        return path

    def _headers(self, path: Path) -> dict:
        etag = hashlib.sha256(path.read_bytes()).hexdigest()
        return {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Content-Length": str(path.stat().st_size)}

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/api/models/{org}/{name}/revision/{revision}")
        def info(org: str, name: str, revision: str):
            if f"{org}/{name}" != self.repo_id:
                return JSONResponse({"error": "Repository not found"}, status_code=404)
            files = sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())
            return {"id": self.repo_id, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}

        @app.get("/api/models/{org}/{name}/tree/{revision}")
        def tree(org: str, name: str, revision: str):
            if f"{org}/{name}" != self.repo_id:
                return JSONResponse({"error": "Repository not found"}, status_code=404)
            return [{"type": "file", "path": p.relative_to(self.folder).as_posix(), "size": p.stat().st_size,
                     "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                    for p in sorted(self.folder.rglob("*")) if p.is_file()]

        @app.head("/{org}/{name}/resolve/{revision}/{filename:path}")
        def head(org: str, name: str, revision: str, filename: str):
            return Response(headers=self._headers(self._file(org, name, filename)))

        @app.get("/{org}/{name}/resolve/{revision}/{filename:path}")
        def get(org: str, name: str, revision: str, filename: str):
            path = self._file(org, name, filename)
            self.downloads.append(filename)
            return FileResponse(path, headers={"X-Repo-Commit": COMMIT})

        return app

    def start(self) -> "FakeHub":
        self.start_app(self.app())
        return self
