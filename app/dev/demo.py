"""The guided walk of `make run`: register SmolLM2 and Gemma, train SmolLM2 prompts for a few
MovieLens-100K users, migrate them to Gemma with live progress, print the before/after metrics
and a curl for one user's prompt, all over the API as an operator would."""

from __future__ import annotations

import argparse
import time
from typing import Any

import httpx
from prompt_migration_client.jobs import follow_job

SOURCE, TARGET, DATASET = "smollm2-135m", "gemma-3-270m", "movielens-100k"


class Unavailable(SystemExit):
    """The API or its Redis is down for now; the supervisor is bringing it back."""


class Demo:
    def __init__(self, base: str, admin: str, read: str, args: argparse.Namespace) -> None:
        self.http = httpx.Client(base_url=base, timeout=30)
        self.admin = {"Authorization": f"Bearer {admin}"}
        self.read = {"Authorization": f"Bearer {read}"}
        self.args = args
        self.base, self.read_token = base, read

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        headers = self.admin if method != "GET" else self.read
        response = self.http.request(method, path, headers=headers, **kwargs)
        if response.status_code == 503:
            raise Unavailable(f"{method} {path} -> 503: {response.text}")
        if response.status_code >= 400:
            raise SystemExit(f"{method} {path} -> {response.status_code}: {response.text}")
        return dict(response.json()) if response.content else {}

    def watch(self, job_id: str) -> dict[str, Any]:
        shown = ""

        def read() -> dict[str, Any]:
            while True:
                try:
                    return self.call("GET", f"/migrations/{job_id}")
                except (httpx.HTTPError, Unavailable):
                    print("  (the service is not answering; the supervisor restarts what died)")
                    time.sleep(2.0)

        def show(job: dict[str, Any]) -> None:
            nonlocal shown
            p = job["progress"]
            loss = f" loss {p['loss']:.3f}" if p.get("loss") is not None else ""
            line = (
                f"  [{job['state']:>9}] {job['stage']:<10} {100 * (p['fraction'] or 0):5.1f}%"
                f"  users mapped {p['users_mapped']}/{p['users_total'] or '?'}{loss}"
            )
            if line != shown:
                print(line, flush=True)
                shown = line

        return follow_job(read, on_update=show)

    def run(self) -> None:
        started = time.monotonic()
        print("\n== 1. Register the foundation models (POST /models)")
        for name in (SOURCE, TARGET):
            model = self.call("POST", "/models", json={"name": name})
            print(f"  {name}: hidden size {model['hidden_size']}")
        print(f"\n== 2. Train {SOURCE} prompts for {self.args.users} MovieLens-100K users")
        body = {
            "dataset": DATASET,
            "task": "rating",
            "max_users": self.args.users,
            "epochs": self.args.epochs,
            "max_train_per_user": self.args.max_train,
        }
        trained = self.watch(self.call("POST", f"/models/{SOURCE}/train", json=body)["id"])
        if trained["state"] != "succeeded":
            raise SystemExit(f"Prompt training ended {trained['state']}: {trained['error']}")
        print(f"  test metrics on {SOURCE}: {_fmt(trained['metrics']['test'])}")
        print(f"\n== 3. Migrate every user's prompt to {TARGET} (POST /migrations)")
        body = {
            "sources": [{"model": SOURCE}],
            "target": TARGET,
            "dataset": DATASET,
            "selection": {"strategy": "puma", "budget": self.args.budget},
            # The measured recipe unless asked otherwise (`--adapter-epochs`).
            "adapter": {"epochs": self.args.adapter_epochs},
            "max_train_per_user": self.args.max_train,
        }
        job = self.call("POST", "/migrations", json=body)
        done = self.watch(job["id"])
        self.report(done, time.monotonic() - started)

    def report(self, job: dict[str, Any], seconds: float) -> None:
        print(f"\n== 4. Result: {job['state']}")
        if job.get("error"):
            print(f"  error: {job['error']}")
        metrics = job.get("metrics") or {}
        for name, values in (metrics.get("sources") or {}).items():
            print(f"  before ({name}): {_fmt(values)}")
        if metrics.get("migrated"):
            print(f"  after  ({TARGET}): {_fmt(metrics['migrated'])}")
        if metrics.get("baseline"):
            print(f"  no personalisation (global mean): {_fmt(metrics['baseline'])}")
        gate = job.get("gate") or {}
        print(
            f"  quality gate: {'passed' if gate.get('passed') else 'failed'}: {gate.get('reason')}"
        )
        if job["state"] == "gate_failed":
            print(
                f"  not promoted; to serve it anyway: curl -X POST -H 'Authorization: Bearer "
                f"<admin token>' '{self.base}/migrations/{job['id']}/promote?force=true'"
            )
        print(f"  cost: {job.get('cost')}")
        print(f"  demo took {seconds:.0f} s")
        user = "1"
        batch = self.call(
            "POST", "/prompts/batch", json={"user_ids": [str(i) for i in range(1, 1000)]}
        )
        if batch.get("prompts"):
            user = sorted(batch["prompts"])[0]
        print("\n== 5. Read one user's prompt for the active model (raw little-endian fp32):")
        print(
            f"  curl -s -D - -H 'Authorization: Bearer {self.read_token}' "
            f"'{self.base}/users/{user}/prompt' -o prompt.bin"
        )
        print(f"  (add ?format=json for humans; API docs at {self.base}/docs)")


def _fmt(values: dict[str, Any]) -> str:
    def one(value: Any) -> str:
        if isinstance(value, float):
            return str(int(value)) if value.is_integer() else f"{value:.4f}"
        return str(value)

    return ", ".join(f"{k} {one(v)}" for k, v in values.items())
