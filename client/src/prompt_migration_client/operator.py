"""The operator's side of the client: models, jobs, promotion, rollback, export and import.

The CLI (``prompt-migration``, in ``cli.py``) is a thin shell over this class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prompt_migration_client.http import PromptClient, raise_for
from prompt_migration_client.setfile import chunks

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


class OperatorClient(PromptClient):
    """Admin routes of the API; needs the admin token."""

    def register_model(self, name: str, *, checkpoint: str | None = None) -> dict[str, Any]:
        body = {"name": name} | ({"checkpoint": checkpoint} if checkpoint else {})
        return dict(self.json("POST", "/models", json=body))

    def models(self) -> list[dict[str, Any]]:
        return list(self.json("GET", "/models"))

    def train(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.json("POST", f"/models/{model}/train", json=body))

    def migrate(
        self, body: dict[str, Any], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return dict(self.json("POST", "/migrations", json=body, headers=headers))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.json("GET", f"/migrations/{job_id}"))

    def promote(self, job_id: str, *, force: bool = False) -> dict[str, Any]:
        params = {"force": "true"} if force else {}
        return dict(self.json("POST", f"/migrations/{job_id}/promote", params=params))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self.json("POST", f"/migrations/{job_id}/cancel"))

    def activate(self, model: str, version: str, *, default: bool = False) -> dict[str, Any]:
        """Serve ``version`` of ``model``; with ``default``, also to readers who name no model."""
        body = {"version": version, "default": default}
        return dict(self.json("POST", f"/models/{model}/activate", json=body))

    def export(
        self, model: str, version: str, dest: Path, *, on_progress: Progress | None = None
    ) -> Path:
        """Stream a sealed set into ``dest`` (a set file); a broken transfer leaves no file."""
        partial = dest.with_name(dest.name + ".partial")
        path = f"/models/{model}/versions/{version}/export"
        with self.http.stream("GET", path, headers=self.headers) as response:
            if response.status_code >= 400:
                response.read()
                raise_for(response)
            total, done = int(response.headers.get("Content-Length") or 0), 0
            with partial.open("wb") as out:
                for block in response.iter_bytes():
                    out.write(block)
                    done += len(block)
                    if on_progress:
                        on_progress(done, total)
        partial.replace(dest)
        return dest

    def import_file(
        self,
        model: str,
        source: Path,
        *,
        activate: bool = False,
        dtype: str | None = None,
        head_from_version: str | None = None,
        placement: str | None = None,
        on_progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Upload a set file as a new sealed version of ``model``, streamed from disk."""
        size = source.stat().st_size
        options = {
            "activate": str(activate).lower(),
            "dtype": dtype,
            "head_from_version": head_from_version,
            "placement": placement,
        }

        def body() -> Iterator[bytes]:
            sent = 0
            for block in chunks(source):
                sent += len(block)
                if on_progress:
                    on_progress(sent, size)
                yield block

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        params = {k: v for k, v in options.items() if v is not None}
        return dict(
            self.json(
                "POST", f"/models/{model}/import", params=params, content=body(), headers=headers
            )
        )
