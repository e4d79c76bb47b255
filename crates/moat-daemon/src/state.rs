//! The daemon's state in SQLite. Every change is one transaction, so a
//! `kill -9` at any point leaves either the old row or the new one. A sandbox
//! row is written as `creating` before anything is made on disk and becomes
//! `stopped` or `running` only once its files exist; the next daemon removes
//! what a `creating` row left behind.

use std::path::Path;

use moat_api::{Limits, PortMapping, SandboxInfo, SandboxStatus, Workspace};
use rusqlite::{params, Connection, OptionalExtension};

use crate::DaemonError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sandboxes (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    agent      TEXT NOT NULL,
    template   TEXT NOT NULL,
    image_id   TEXT NOT NULL,
    layers     TEXT NOT NULL,
    workspaces TEXT NOT NULL,
    limits     TEXT NOT NULL,
    ports      TEXT NOT NULL,
    status     TEXT NOT NULL,
    pid        INTEGER,
    pid_start  INTEGER,
    created    TEXT NOT NULL,
    policy     TEXT NOT NULL DEFAULT '',
    netns      TEXT NOT NULL DEFAULT '',
    isolation  TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS network_log (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    time        TEXT NOT NULL,
    sandbox     TEXT NOT NULL,
    method      TEXT NOT NULL,
    host        TEXT NOT NULL,
    port        INTEGER NOT NULL,
    path        TEXT,
    rule        TEXT NOT NULL,
    decision    TEXT NOT NULL,
    status      INTEGER NOT NULL,
    bytes_up    INTEGER NOT NULL,
    bytes_down  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS network_log_sandbox ON network_log (sandbox, seq);
";

/// The network log keeps this many rows; older ones go.
pub const NETWORK_LOG_ROWS: i64 = 100_000;

/// A sandbox as stored: its public description plus what the daemon needs.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub info: SandboxInfo,
    /// Diff ids of the image layers it mounts, lowest first.
    pub layers: Vec<String>,
    /// `creating`, `running` or `stopped`.
    pub phase: String,
    /// Start time of init (clock ticks since boot), to tell a reused pid apart.
    pub pid_start: Option<u64>,
}

pub struct State {
    conn: Connection,
}

fn db_err(e: rusqlite::Error) -> DaemonError {
    DaemonError::State(e.to_string())
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl State {
    pub fn open(path: &Path) -> Result<State, DaemonError> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;",
        )
        .map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        // Columns that databases of earlier versions lack.
        for column in ["policy", "netns", "isolation"] {
            if conn
                .prepare(&format!("SELECT {column} FROM sandboxes LIMIT 0"))
                .is_err()
            {
                conn.execute_batch(&format!(
                    "ALTER TABLE sandboxes ADD COLUMN {column} TEXT NOT NULL DEFAULT ''"
                ))
                .map_err(db_err)?;
            }
        }
        Ok(State { conn })
    }

    pub fn insert(&mut self, row: &SandboxRow) -> Result<(), DaemonError> {
        let i = &row.info;
        let res = self.conn.execute(
            "INSERT INTO sandboxes (id, name, agent, template, image_id, layers, workspaces, limits, ports, status, pid, pid_start, created, isolation)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                i.id, i.name, i.agent, i.template, i.image_id, json(&row.layers), json(&i.workspaces),
                json(&i.limits), json(&i.ports), row.phase, i.pid, row.pid_start.map(|v| v as i64), i.created,
                i.isolation.tier.name()
            ],
        );
        match res {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(DaemonError::NameTaken(i.name.clone()))
            }
            Err(e) => Err(db_err(e)),
        }
    }

    /// A number that no other sandbox in the state has while this one
    /// exists (SQLite's rowid), for per-sandbox host ids.
    pub fn slot(&self, id: &str) -> Result<u32, DaemonError> {
        self.conn
            .query_row(
                "SELECT rowid FROM sandboxes WHERE id = ?1",
                params![id],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u32)
            .map_err(db_err)
    }

    pub fn set_phase(
        &mut self,
        id: &str,
        phase: &str,
        pid: Option<i32>,
        pid_start: Option<u64>,
    ) -> Result<(), DaemonError> {
        self.conn
            .execute(
                "UPDATE sandboxes SET status = ?2, pid = ?3, pid_start = ?4 WHERE id = ?1",
                params![id, phase, pid, pid_start.map(|v| v as i64)],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub fn set_ports(&mut self, id: &str, ports: &[PortMapping]) -> Result<(), DaemonError> {
        self.conn
            .execute(
                "UPDATE sandboxes SET ports = ?2 WHERE id = ?1",
                params![id, json(&ports)],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub fn set_limits(&mut self, id: &str, limits: &Limits) -> Result<(), DaemonError> {
        self.conn
            .execute(
                "UPDATE sandboxes SET limits = ?2 WHERE id = ?1",
                params![id, json(limits)],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// The sandbox's network policy as stored (JSON), if one was set.
    pub fn policy(&self, id: &str) -> Result<Option<String>, DaemonError> {
        let text: Option<String> = self
            .conn
            .query_row(
                "SELECT policy FROM sandboxes WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        Ok(text.filter(|t| !t.is_empty()))
    }

    /// The network namespace of the sandbox's running init, as `dev:ino`.
    pub fn netns(&self, id: &str) -> Result<Option<String>, DaemonError> {
        let text: Option<String> = self
            .conn
            .query_row(
                "SELECT netns FROM sandboxes WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        Ok(text.filter(|t| !t.is_empty()))
    }

    pub fn set_netns(&mut self, id: &str, netns: &str) -> Result<(), DaemonError> {
        self.conn
            .execute(
                "UPDATE sandboxes SET netns = ?2 WHERE id = ?1",
                params![id, netns],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub fn set_policy(&mut self, id: &str, policy_json: &str) -> Result<(), DaemonError> {
        self.conn
            .execute(
                "UPDATE sandboxes SET policy = ?2 WHERE id = ?1",
                params![id, policy_json],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// Append log rows in one transaction and keep the log within its bound.
    pub fn append_log(&mut self, rows: &[moat_gateway::LogEntry]) -> Result<(), DaemonError> {
        let tx = self.conn.transaction().map_err(db_err)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO network_log (time, sandbox, method, host, port, path, rule, decision, status, bytes_up, bytes_down, duration_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )
                .map_err(db_err)?;
            for e in rows {
                stmt.execute(params![
                    e.time,
                    e.sandbox,
                    e.method,
                    e.host,
                    e.port,
                    e.path,
                    e.rule,
                    e.decision,
                    e.status,
                    e.bytes_up as i64,
                    e.bytes_down as i64,
                    e.duration_ms as i64
                ])
                .map_err(db_err)?;
            }
            tx.execute(
                "DELETE FROM network_log WHERE seq <= (SELECT MAX(seq) FROM network_log) - ?1",
                params![NETWORK_LOG_ROWS],
            )
            .map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// The newest `limit` rows (of one sandbox, or all), oldest first.
    pub fn network_log(
        &self,
        sandbox: Option<&str>,
        limit: i64,
    ) -> Result<Vec<moat_gateway::LogEntry>, DaemonError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT time, sandbox, method, host, port, path, rule, decision, status, bytes_up, bytes_down, duration_ms FROM (
                   SELECT * FROM network_log WHERE ?1 IS NULL OR sandbox = ?1 ORDER BY seq DESC LIMIT ?2
                 ) ORDER BY seq",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(params![sandbox, limit], |r| {
                Ok(moat_gateway::LogEntry {
                    time: r.get(0)?,
                    sandbox: r.get(1)?,
                    method: r.get(2)?,
                    host: r.get(3)?,
                    port: r.get(4)?,
                    path: r.get(5)?,
                    rule: r.get(6)?,
                    decision: r.get(7)?,
                    status: r.get(8)?,
                    bytes_up: r.get::<_, i64>(9)? as u64,
                    bytes_down: r.get::<_, i64>(10)? as u64,
                    duration_ms: r.get::<_, i64>(11)? as u64,
                })
            })
            .map_err(db_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
    }

    pub fn delete(&mut self, id: &str) -> Result<(), DaemonError> {
        self.conn
            .execute("DELETE FROM sandboxes WHERE id = ?1", params![id])
            .map_err(db_err)?;
        Ok(())
    }

    pub fn all(&self) -> Result<Vec<SandboxRow>, DaemonError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, name, agent, template, image_id, layers, workspaces, limits, ports, status, pid, pid_start, created, isolation FROM sandboxes ORDER BY created, name")
            .map_err(db_err)?;
        let rows = stmt.query_map([], row_from_sql).map_err(db_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
    }

    pub fn by_name(&self, name: &str) -> Result<Option<SandboxRow>, DaemonError> {
        self.conn
            .query_row(
                "SELECT id, name, agent, template, image_id, layers, workspaces, limits, ports, status, pid, pid_start, created, isolation FROM sandboxes WHERE name = ?1",
                params![name],
                row_from_sql,
            )
            .optional()
            .map_err(db_err)
    }
}

fn row_from_sql(r: &rusqlite::Row) -> rusqlite::Result<SandboxRow> {
    fn parse<T: serde::de::DeserializeOwned + Default>(s: String) -> T {
        serde_json::from_str(&s).unwrap_or_default()
    }
    let phase: String = r.get(9)?;
    let workspaces: Vec<Workspace> = parse(r.get(6)?);
    let info = SandboxInfo {
        id: r.get(0)?,
        name: r.get(1)?,
        agent: r.get(2)?,
        template: r.get(3)?,
        image_id: r.get(4)?,
        workspaces,
        limits: parse(r.get(7)?),
        ports: parse(r.get(8)?),
        status: if phase == "running" {
            SandboxStatus::Running
        } else {
            SandboxStatus::Stopped
        },
        pid: r.get(10)?,
        created: r.get(12)?,
        // Rows of earlier versions have '': the namespace tier, then the only one.
        isolation: moat_api::IsolationInfo {
            tier: r.get::<_, String>(13)?.parse().unwrap_or_default(),
            ..Default::default()
        },
    };
    Ok(SandboxRow {
        info,
        layers: parse(r.get(5)?),
        phase,
        pid_start: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str) -> SandboxRow {
        SandboxRow {
            info: SandboxInfo {
                id: format!("id-{name}"),
                name: name.into(),
                agent: "shell".into(),
                template: "moat/shell:latest".into(),
                image_id: "sha256:00".into(),
                status: SandboxStatus::Stopped,
                workspaces: vec![Workspace {
                    path: "/w".into(),
                    read_only: false,
                }],
                created: "2026-11-22T00:00:00Z".into(),
                limits: Limits {
                    memory: Some(1),
                    cpus: None,
                    pids: Some(2),
                    enforced: true,
                    note: "cgroup v1".into(),
                    disk: moat_api::DiskLimit {
                        bytes: Some(3 << 20),
                        enforced: true,
                        by: "ext4 image on a loop device".into(),
                    },
                },
                ports: vec![PortMapping {
                    host_port: 1,
                    sandbox_port: 2,
                }],
                pid: None,
                isolation: moat_api::IsolationInfo {
                    tier: moat_api::Isolation::Gvisor,
                    ..Default::default()
                },
            },
            layers: vec!["sha256:aa".into()],
            phase: "stopped".into(),
            pid_start: None,
        }
    }

    #[test]
    fn the_network_log_is_bounded_and_read_newest_last() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = State::open(&dir.path().join("db")).unwrap();
        let entry = |n: u16| moat_gateway::LogEntry {
            time: "t".into(),
            sandbox: if n.is_multiple_of(2) {
                "a".into()
            } else {
                "b".into()
            },
            method: "GET".into(),
            host: "h".into(),
            port: n,
            path: None,
            rule: "r".into(),
            decision: "allowed".into(),
            status: 200,
            bytes_up: 1,
            bytes_down: 2,
            duration_ms: 3,
        };
        st.append_log(&(0..10).map(entry).collect::<Vec<_>>())
            .unwrap();
        let ports =
            |rows: Vec<moat_gateway::LogEntry>| rows.iter().map(|e| e.port).collect::<Vec<_>>();
        assert_eq!(ports(st.network_log(Some("a"), 3).unwrap()), vec![4, 6, 8]);
        assert_eq!(ports(st.network_log(None, 2).unwrap()), vec![8, 9]);
    }

    #[test]
    fn rows_round_trip_and_names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = State::open(&dir.path().join("db")).unwrap();
        st.insert(&row("a")).unwrap();
        assert_eq!(st.by_name("a").unwrap(), Some(row("a")));
        let mut dup = row("a");
        dup.info.id = "other".into();
        assert!(matches!(st.insert(&dup), Err(DaemonError::NameTaken(_))));
        st.set_phase("id-a", "running", Some(42), Some(7)).unwrap();
        let got = st.by_name("a").unwrap().unwrap();
        assert_eq!(
            (got.info.status, got.info.pid, got.pid_start),
            (SandboxStatus::Running, Some(42), Some(7))
        );
        st.delete("id-a").unwrap();
        assert_eq!(st.all().unwrap(), vec![]);
    }
}
