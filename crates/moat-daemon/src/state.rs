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
    created    TEXT NOT NULL
);
";

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
        Ok(State { conn })
    }

    pub fn insert(&mut self, row: &SandboxRow) -> Result<(), DaemonError> {
        let i = &row.info;
        let res = self.conn.execute(
            "INSERT INTO sandboxes (id, name, agent, template, image_id, layers, workspaces, limits, ports, status, pid, pid_start, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                i.id, i.name, i.agent, i.template, i.image_id, json(&row.layers), json(&i.workspaces),
                json(&i.limits), json(&i.ports), row.phase, i.pid, row.pid_start.map(|v| v as i64), i.created
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

    pub fn delete(&mut self, id: &str) -> Result<(), DaemonError> {
        self.conn
            .execute("DELETE FROM sandboxes WHERE id = ?1", params![id])
            .map_err(db_err)?;
        Ok(())
    }

    pub fn all(&self) -> Result<Vec<SandboxRow>, DaemonError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, name, agent, template, image_id, layers, workspaces, limits, ports, status, pid, pid_start, created FROM sandboxes ORDER BY created, name")
            .map_err(db_err)?;
        let rows = stmt.query_map([], row_from_sql).map_err(db_err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
    }

    pub fn by_name(&self, name: &str) -> Result<Option<SandboxRow>, DaemonError> {
        self.conn
            .query_row(
                "SELECT id, name, agent, template, image_id, layers, workspaces, limits, ports, status, pid, pid_start, created FROM sandboxes WHERE name = ?1",
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
        isolation: "namespaces".into(),
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
                },
                ports: vec![PortMapping {
                    host_port: 1,
                    sandbox_port: 2,
                }],
                pid: None,
                isolation: "namespaces".into(),
            },
            layers: vec!["sha256:aa".into()],
            phase: "stopped".into(),
            pid_start: None,
        }
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
