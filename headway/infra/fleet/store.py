"""The control plane's state in SQLite: deployments (their specs and manual scale), replicas
(their provider handles, phases and startup breakdowns), API keys (their hashes and scopes) and each
deployment's autoscaler state (its last decision, recent concurrency samples and the policy's state;
no request content).

It is the control plane's memory across its own restarts: on start it reads the replicas back and
adopts the ones still alive instead of starting new ones. One writer (the control plane's loop);
every change is committed at once (WAL, so `headway status` reads never block it).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headway.infra.fleet.keys import KeyRecord
from headway.infra.fleet.spec import DeploymentSpec

PHASES = ("starting", "ready", "draining", "stopped", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    manual INTEGER,
    created REAL NOT NULL,
    deleting INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    deployment TEXT NOT NULL,
    generation INTEGER NOT NULL,
    provider TEXT NOT NULL,
    handle TEXT NOT NULL,
    url TEXT,
    phase TEXT NOT NULL,
    scheduled_at REAL NOT NULL,
    ready_at REAL,
    ended_at REAL,
    breakdown TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS replicas_by_deployment ON replicas (deployment, phase);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    digest TEXT NOT NULL UNIQUE,
    deployments TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    expires REAL,
    revoked REAL,
    rpm INTEGER,
    tpm INTEGER
);
CREATE TABLE IF NOT EXISTS autoscaler (
    deployment TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
"""


@dataclass
class DeploymentRow:
    name: str
    spec: DeploymentSpec
    generation: int
    manual: int | None
    created: float
    deleting: bool


@dataclass
class ReplicaRow:
    id: str
    deployment: str
    generation: int
    provider: str
    handle: dict[str, Any]
    url: str | None
    phase: str
    scheduled_at: float
    ready_at: float | None = None
    ended_at: float | None = None
    breakdown: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def active(self) -> bool:
        return self.phase in ("starting", "ready")


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # specs hold secret env values: the database (and its -wal/-shm, which SQLite creates with the
        # same mode) is readable by this user only; the API shows specs through public_dump()
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # --- deployments ----------------------------------------------------------------------------
    def put_deployment(self, spec: DeploymentSpec, bump_generation: bool) -> DeploymentRow:
        old = self.deployment(spec.name)
        gen = (old.generation + (1 if bump_generation else 0)) if old else 1
        self.db.execute("INSERT INTO deployments (name, spec, generation, manual, created, deleting) "
                        "VALUES (?, ?, ?, NULL, ?, 0) ON CONFLICT(name) DO UPDATE SET spec=excluded.spec, "
                        "generation=excluded.generation, deleting=0",
                        (spec.name, spec.model_dump_json(), gen, time.time()))
        row = self.deployment(spec.name)
        assert row is not None
        return row

    def set_manual(self, name: str, replicas: int | None) -> None:
        self.db.execute("UPDATE deployments SET manual=? WHERE name=?", (replicas, name))

    def mark_deleting(self, name: str) -> None:
        self.db.execute("UPDATE deployments SET deleting=1 WHERE name=?", (name,))

    def drop_deployment(self, name: str) -> None:
        self.db.execute("DELETE FROM deployments WHERE name=?", (name,))
        self.db.execute("DELETE FROM replicas WHERE deployment=?", (name,))
        self.db.execute("DELETE FROM autoscaler WHERE deployment=?", (name,))

    def deployment(self, name: str) -> DeploymentRow | None:
        row = self.db.execute("SELECT name, spec, generation, manual, created, deleting FROM deployments WHERE name=?",
                              (name,)).fetchone()
        return self._deployment(row) if row else None

    def deployments(self) -> list[DeploymentRow]:
        rows = self.db.execute("SELECT name, spec, generation, manual, created, deleting FROM deployments "
                               "ORDER BY name").fetchall()
        return [self._deployment(r) for r in rows]

    @staticmethod
    def _deployment(row: tuple[Any, ...]) -> DeploymentRow:
        return DeploymentRow(row[0], DeploymentSpec.model_validate_json(row[1]), row[2], row[3], row[4], bool(row[5]))

    # --- replicas -------------------------------------------------------------------------------
    def put_replica(self, r: ReplicaRow) -> None:
        self.db.execute(
            "INSERT INTO replicas (id, deployment, generation, provider, handle, url, phase, scheduled_at, ready_at, "
            "ended_at, breakdown, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
            "handle=excluded.handle, url=excluded.url, phase=excluded.phase, ready_at=excluded.ready_at, "
            "ended_at=excluded.ended_at, breakdown=excluded.breakdown, error=excluded.error",
            (r.id, r.deployment, r.generation, r.provider, json.dumps(r.handle), r.url, r.phase, r.scheduled_at,
             r.ready_at, r.ended_at, json.dumps(r.breakdown), r.error))

    def replicas(self, deployment: str | None = None, *, live_only: bool = False) -> list[ReplicaRow]:
        q = ("SELECT id, deployment, generation, provider, handle, url, phase, scheduled_at, ready_at, ended_at, "
             "breakdown, error FROM replicas")
        cond, args = [], []
        if deployment is not None:
            cond.append("deployment=?")
            args.append(deployment)
        if live_only:
            cond.append("phase IN ('starting', 'ready', 'draining')")
        if cond:
            q += " WHERE " + " AND ".join(cond)
        q += " ORDER BY scheduled_at"
        return [ReplicaRow(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], r[8], r[9], json.loads(r[10]),
                           r[11]) for r in self.db.execute(q, args).fetchall()]

    def prune(self, deployment: str, keep: int = 20) -> None:
        """Forget all but the newest `keep` ended replicas of a deployment (their breakdowns feed
        the measured startup time; older ones are history nobody reads)."""
        self.db.execute("DELETE FROM replicas WHERE deployment=? AND phase IN ('stopped', 'failed') AND id NOT IN "
                        "(SELECT id FROM replicas WHERE deployment=? AND phase IN ('stopped', 'failed') "
                        "ORDER BY scheduled_at DESC LIMIT ?)", (deployment, deployment, keep))

    # --- keys -----------------------------------------------------------------------------------
    def put_key(self, k: KeyRecord) -> None:
        self.db.execute("INSERT INTO keys (id, name, scope, digest, deployments, created, expires, revoked, rpm, tpm) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (k.id, k.name, k.scope, k.digest,
                                                                  json.dumps(list(k.deployments)), k.created,
                                                                  k.expires, k.revoked, k.rpm, k.tpm))

    def keys(self) -> list[KeyRecord]:
        rows = self.db.execute("SELECT id, name, scope, digest, deployments, created, expires, revoked, rpm, tpm "
                               "FROM keys ORDER BY created").fetchall()
        return [KeyRecord(r[0], r[1], r[2], r[3], r[5], tuple(json.loads(r[4])), r[6], r[7], r[8], r[9]) for r in rows]

    def revoke_key(self, key_id: str, now: float) -> bool:
        """Mark a key revoked (kept, so `headway keys list` shows when); False if there is no such key."""
        cur = self.db.execute("UPDATE keys SET revoked=COALESCE(revoked, ?) WHERE id=?", (now, key_id))
        return cur.rowcount > 0

    # --- autoscaler state -----------------------------------------------------------------------
    def put_autoscaler_state(self, deployment: str, state: dict[str, Any]) -> None:
        """The autoscaler's last decision for a deployment (written once per decision)."""
        self.db.execute("INSERT INTO autoscaler (deployment, state) VALUES (?, ?) ON CONFLICT(deployment) "
                        "DO UPDATE SET state=excluded.state", (deployment, json.dumps(state)))

    def autoscaler_state(self, deployment: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT state FROM autoscaler WHERE deployment=?", (deployment,)).fetchone()
        if row is None:
            return None
        try:
            state = json.loads(row[0])
        except ValueError:
            return None                  # unreadable: decide from scratch (holding what is adopted)
        return state if isinstance(state, dict) else None
