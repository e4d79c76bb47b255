//! How ids inside a sandbox map to ids on the host.
//!
//! As root, every id inside maps into a dedicated range of unprivileged host
//! ids starting at `base`, the `agent` user's too: nothing inside is a
//! privileged id on the host, so no file a sandbox leaves behind (a set-id
//! bit, a file capability) can give anyone host root. Workspaces are mounted
//! idmapped ([`MountIdMap`]) so that the agent's files still belong to the
//! workspace's owner on the host. Rootless, ids map into the caller's
//! subordinate range from /etc/subuid, and the `agent` user (uid 1000) to the
//! caller's own uid, as with bubblewrap: an unprivileged user cannot make
//! idmapped mounts of host file systems, and the caller is no more privileged
//! than the sandbox anyway.

use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The uid of the `agent` user inside every sandbox.
pub const AGENT_UID: u32 = 1000;
/// How many ids a sandbox has: 0..65536.
pub const RANGE: u32 = 65536;
/// The id at which moat's helpers (never a sandbox) see the host's root.
const HELPER_HOST_ROOT: u32 = u32::MAX - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMapping {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub uids: Vec<IdMapping>,
    pub gids: Vec<IdMapping>,
    /// Rootless maps are written by the setuid helpers newuidmap/newgidmap.
    pub rootless: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IdMapError {
    #[error("user {user} has no subordinate {kind} range in {file}: add one with `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}`")]
    NoSubordinateRange {
        user: String,
        kind: &'static str,
        file: &'static str,
    },
    #[error("the subordinate {kind} range of {user} has {count} ids; a sandbox needs {RANGE}: give it a larger one in {file}")]
    RangeTooSmall {
        user: String,
        kind: &'static str,
        file: &'static str,
        count: u32,
    },
    #[error("{tool} is not installed; rootless sandboxes need it: `apt-get install uidmap`")]
    MissingHelper { tool: &'static str },
    #[error("could not write the id map of process {pid}: {detail}")]
    Write { pid: i32, detail: String },
}

/// How an idmapped workspace mount translates ids: each entry maps an id on
/// disk (`inside`) to the host id a sandboxed process has (`outside`). The
/// workspace's owner shows as the agent, and the agent's writes land as the
/// owner; the sandbox's other ids are written as themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountIdMap {
    pub uids: Vec<IdMapping>,
    pub gids: Vec<IdMapping>,
}

/// The whole range from `base`.
fn contiguous_map(base: u32) -> Vec<IdMapping> {
    vec![IdMapping {
        inside: 0,
        outside: base,
        count: RANGE,
    }]
}

/// An idmapped mount's entries for one kind of id: `owner` on disk shows as
/// `agent` (a host id), every other id of the sandbox's `range` as itself.
/// None where the owner already is one of the sandbox's ids.
fn owner_as_agent(owner: u32, agent: u32, range: &[IdMapping]) -> Option<Vec<IdMapping>> {
    if lookup_outside(range, owner).is_some() {
        return None;
    }
    let mut map = vec![IdMapping {
        inside: owner,
        outside: agent,
        count: 1,
    }];
    for m in range {
        let (start, end) = (m.outside, m.outside + m.count);
        if agent >= start && agent < end {
            if agent > start {
                map.push(IdMapping {
                    inside: start,
                    outside: start,
                    count: agent - start,
                });
            }
            if agent + 1 < end {
                map.push(IdMapping {
                    inside: agent + 1,
                    outside: agent + 1,
                    count: end - agent - 1,
                });
            }
        } else {
            map.push(IdMapping {
                inside: start,
                outside: start,
                count: m.count,
            });
        }
    }
    Some(map)
}

fn lookup_outside(map: &[IdMapping], host: u32) -> Option<u32> {
    map.iter()
        .find(|m| host >= m.outside && host - m.outside < m.count)
        .map(|m| m.inside + (host - m.outside))
}

/// Build the three-piece map: 0..1000 and 1001..65536 from `base`, 1000 to `own`.
fn split_map(own: u32, base: u32) -> Vec<IdMapping> {
    vec![
        IdMapping {
            inside: 0,
            outside: base,
            count: AGENT_UID,
        },
        IdMapping {
            inside: AGENT_UID,
            outside: own,
            count: 1,
        },
        IdMapping {
            inside: AGENT_UID + 1,
            outside: base + AGENT_UID + 1,
            count: RANGE - AGENT_UID - 1,
        },
    ]
}

impl IdMap {
    /// The map for a daemon running as root: a dedicated range at `base`,
    /// the agent's id included.
    pub fn for_root(base: u32) -> IdMap {
        IdMap {
            uids: contiguous_map(base),
            gids: contiguous_map(base),
            rootless: false,
        }
    }

    /// The idmapped mount that shows a workspace owned by `uid`:`gid` on the
    /// host as the agent's. None rootless (the agent is the caller already,
    /// and only root may idmap a host file system) and where the agent's
    /// host id already owns it.
    pub fn workspace_mount(&self, uid: u32, gid: u32) -> Option<MountIdMap> {
        if self.rootless {
            return None;
        }
        let agent_uid = self.host_uid(AGENT_UID)?;
        let agent_gid = self.host_gid(AGENT_UID)?;
        Some(MountIdMap {
            uids: owner_as_agent(uid, agent_uid, &self.uids)?,
            gids: owner_as_agent(gid, agent_gid, &self.gids)?,
        })
    }

    /// The map for a daemon running as `uid`/`gid` named `user`, from its subordinate ranges.
    pub fn for_user(user: &str, uid: u32, gid: u32) -> Result<IdMap, IdMapError> {
        let sub_uid = subordinate_start(Path::new("/etc/subuid"), user, uid, "uid", "/etc/subuid")?;
        let sub_gid = subordinate_start(Path::new("/etc/subgid"), user, uid, "gid", "/etc/subgid")?;
        Ok(IdMap {
            uids: split_map(uid, sub_uid),
            gids: split_map(gid, sub_gid),
            rootless: true,
        })
    }

    /// The map of moat's own helpers that work on the sandboxes' files from
    /// inside their user namespace (unpacking layers, archiving a sandbox's
    /// layer): the sandboxes' map, plus, as root, the host's root at the
    /// last id (which no layer entry may claim), so that the helper can
    /// still reach the root-only state directory. Never a sandbox's map.
    pub fn for_helpers(&self) -> IdMap {
        let mut map = self.clone();
        if !self.rootless {
            let host_root = IdMapping {
                inside: HELPER_HOST_ROOT,
                outside: 0,
                count: 1,
            };
            map.uids.push(host_root);
            map.gids.push(host_root);
        }
        map
    }

    /// The host uid that an id inside maps to, if any.
    pub fn host_uid(&self, inside: u32) -> Option<u32> {
        lookup(&self.uids, inside)
    }

    pub fn host_gid(&self, inside: u32) -> Option<u32> {
        lookup(&self.gids, inside)
    }

    /// Write this map for process `pid`, which has just made its user namespace.
    pub fn apply(&self, pid: i32) -> Result<(), IdMapError> {
        if self.rootless {
            run_helper("newuidmap", pid, &self.uids)?;
            run_helper("newgidmap", pid, &self.gids)
        } else {
            let write = |file: &str, map: &[IdMapping]| {
                fs::write(format!("/proc/{pid}/{file}"), render(map)).map_err(|e| {
                    IdMapError::Write {
                        pid,
                        detail: format!("{file}: {e}"),
                    }
                })
            };
            write("uid_map", &self.uids)?;
            write("gid_map", &self.gids)
        }
    }
}

fn lookup(map: &[IdMapping], inside: u32) -> Option<u32> {
    map.iter()
        .find(|m| inside >= m.inside && inside - m.inside < m.count)
        .map(|m| m.outside + (inside - m.inside))
}

/// A map as `/proc/PID/uid_map` takes it.
pub fn render(map: &[IdMapping]) -> String {
    map.iter()
        .map(|m| format!("{} {} {}\n", m.inside, m.outside, m.count))
        .collect()
}

fn run_helper(tool: &'static str, pid: i32, map: &[IdMapping]) -> Result<(), IdMapError> {
    let mut cmd = Command::new(tool);
    cmd.arg(pid.to_string());
    for m in map {
        cmd.args([
            m.inside.to_string(),
            m.outside.to_string(),
            m.count.to_string(),
        ]);
    }
    let out = cmd.output().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => IdMapError::MissingHelper { tool },
        _ => IdMapError::Write {
            pid,
            detail: format!("{tool}: {e}"),
        },
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(IdMapError::Write {
            pid,
            detail: format!("{tool}: {}", String::from_utf8_lossy(&out.stderr).trim()),
        })
    }
}

/// The first id of `user`'s subordinate range (matched by name or uid) of at least RANGE ids.
fn subordinate_start(
    path: &Path,
    user: &str,
    uid: u32,
    kind: &'static str,
    file: &'static str,
) -> Result<u32, IdMapError> {
    let text = fs::read_to_string(path).unwrap_or_default();
    parse_subordinate(&text, user, uid).map_err(|count| match count {
        0 => IdMapError::NoSubordinateRange {
            user: user.into(),
            kind,
            file,
        },
        count => IdMapError::RangeTooSmall {
            user: user.into(),
            kind,
            file,
            count,
        },
    })
}

/// Err carries the largest range found (0 if none).
fn parse_subordinate(text: &str, user: &str, uid: u32) -> Result<u32, u32> {
    let mut largest = 0;
    for line in text.lines() {
        let mut parts = line.trim().split(':');
        let (Some(who), Some(start), Some(count)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if who != user && who != uid.to_string() {
            continue;
        }
        let (Ok(start), Ok(count)) = (start.parse::<u32>(), count.parse::<u32>()) else {
            continue;
        };
        if count >= RANGE {
            return Ok(start);
        }
        largest = largest.max(count);
    }
    Err(largest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_map_gives_every_id_inside_an_unprivileged_host_id() {
        let map = IdMap::for_root(1_000_000_000);
        assert_eq!(
            map.uids,
            vec![IdMapping {
                inside: 0,
                outside: 1_000_000_000,
                count: 65536
            }]
        );
        assert_eq!(map.host_uid(0), Some(1_000_000_000));
        assert_eq!(map.host_uid(1000), Some(1_000_001_000));
        assert_eq!(map.host_uid(65535), Some(1_000_065_535));
        assert_eq!(map.host_uid(65536), None);
        assert_eq!(render(&map.uids), "0 1000000000 65536\n");
    }

    #[test]
    fn a_workspace_mount_shows_its_owner_as_the_agent_and_the_rest_as_themselves() {
        let map = IdMap::for_root(1_000_000_000);
        let ws = map.workspace_mount(0, 50).unwrap();
        assert_eq!(
            ws.uids,
            vec![
                IdMapping {
                    inside: 0,
                    outside: 1_000_001_000,
                    count: 1
                },
                IdMapping {
                    inside: 1_000_000_000,
                    outside: 1_000_000_000,
                    count: 1000
                },
                IdMapping {
                    inside: 1_000_001_001,
                    outside: 1_000_001_001,
                    count: 64535
                },
            ]
        );
        assert_eq!(ws.gids[0].inside, 50);
        // Owned by one of the sandbox's own ids: a plain bind shows it as it is.
        assert_eq!(map.workspace_mount(1_000_001_000, 0), None);
        // Rootless: no idmapped mounts.
        let rootless = IdMap {
            rootless: true,
            ..map
        };
        assert_eq!(rootless.workspace_mount(0, 0), None);
    }

    #[test]
    fn subordinate_ranges_are_found_by_name_or_uid() {
        let text = "alice:100000:65536\n1001:300000:65536\nbob:200000:100\n";
        assert_eq!(parse_subordinate(text, "alice", 1000), Ok(100000));
        assert_eq!(parse_subordinate(text, "carol", 1001), Ok(300000));
        assert_eq!(parse_subordinate(text, "bob", 1002), Err(100));
        assert_eq!(parse_subordinate(text, "dave", 1003), Err(0));
    }
}
