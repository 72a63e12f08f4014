-- prunesweep coordinator schema (SQLite). Times are milliseconds since the Unix epoch.

-- One row per sweep name; a resubmit of the same name extends the sweep.
CREATE TABLE sweeps (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL UNIQUE,
    spec         TEXT    NOT NULL,            -- the latest submitted SweepSpec, JSON
    state        TEXT    NOT NULL,            -- active | cancelled
    priority     INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);

-- Jobs: score, baseline and cell jobs; `key` is the sha256 of the canonical cell spec.
CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY,
    sweep_id         INTEGER NOT NULL REFERENCES sweeps (id),
    key              TEXT    NOT NULL,
    kind             TEXT    NOT NULL,        -- score | baseline | cell
    model            TEXT    NOT NULL,        -- model source: the affinity key
    spec             TEXT    NOT NULL,        -- canonical CellSpec JSON
    state            TEXT    NOT NULL,        -- blocked | pending | leased | succeeded | failed | cancelled
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    priority         INTEGER NOT NULL,
    depends_on       INTEGER REFERENCES jobs (id),
    lease_id         TEXT,
    lease_expires_at INTEGER,
    worker_id        TEXT,
    phase            TEXT,
    error            TEXT,
    error_kind       TEXT,
    layers_dropped   TEXT,                    -- JSON array of original layer indices
    num_layers       INTEGER,
    timings          TEXT,                    -- JSON [{phase, seconds}]
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    finished_at      INTEGER,
    UNIQUE (sweep_id, key)
);
CREATE INDEX jobs_pending ON jobs (priority DESC, id) WHERE state = 'pending';
CREATE INDEX jobs_pending_model ON jobs (model, priority DESC, id) WHERE state = 'pending';
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'leased';
CREATE INDEX jobs_depends_on ON jobs (depends_on);
CREATE INDEX jobs_sweep_state ON jobs (sweep_id, state);

-- Registered worker processes.
CREATE TABLE workers (
    id            TEXT    PRIMARY KEY,
    name          TEXT    NOT NULL,
    device        TEXT    NOT NULL,
    memory_bytes  INTEGER,
    version       TEXT    NOT NULL,
    registered_at INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL
);

-- Score jobs' distance tables: metric `angular` d(l, n) or `block_influence` (n = 1).
CREATE TABLE distances (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    metric TEXT    NOT NULL,
    n      INTEGER NOT NULL,
    l      INTEGER NOT NULL,
    value  REAL    NOT NULL,
    PRIMARY KEY (job_id, metric, n, l)
);

-- Results in long format.
CREATE TABLE results (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    task   TEXT    NOT NULL,
    metric TEXT    NOT NULL,
    value  REAL    NOT NULL,
    PRIMARY KEY (job_id, task, metric)
);

-- Every job state change, for WatchSweep and the record.
CREATE TABLE events (
    id        INTEGER PRIMARY KEY,
    sweep_id  INTEGER NOT NULL REFERENCES sweeps (id),
    job_id    INTEGER NOT NULL REFERENCES jobs (id),
    state     TEXT    NOT NULL,
    worker_id TEXT,
    message   TEXT,
    at        INTEGER NOT NULL
);
CREATE INDEX events_sweep ON events (sweep_id, id);
