//! Who a process runs as, and with what environment, from the sandbox's own
//! `/etc/passwd` and `/etc/group`: the same rules on every tier. This file
//! uses the standard library only, because the gVisor tier's guest helper
//! (`guest/main.rs`, a static binary that runs inside the sandbox) compiles
//! it too.

use std::os::unix::fs::PermissionsExt;

/// A user of the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: String,
    pub shell: String,
    /// Supplementary groups, the primary one included.
    pub groups: Vec<u32>,
}

/// `wanted` is a user name, `uid` or `uid:gid`; `agent` when absent.
pub fn resolve_user(wanted: Option<&str>, passwd: &str, group: &str) -> Result<User, String> {
    let wanted = wanted.unwrap_or("agent");
    let (who, gid_override) = match wanted.split_once(':') {
        Some((u, g)) => (
            u,
            Some(
                g.parse::<u32>()
                    .map_err(|_| format!("bad group id in {wanted:?}"))?,
            ),
        ),
        None => (wanted, None),
    };
    let numeric = who.parse::<u32>().ok();
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| {
            f.len() >= 7 && (f[0] == who || numeric.is_some_and(|n| f[2].parse::<u32>() == Ok(n)))
        });
    let mut user = match (entry, numeric) {
        (Some(f), _) => User {
            uid: f[2]
                .parse()
                .map_err(|_| format!("bad uid for {who} in /etc/passwd"))?,
            gid: f[3]
                .parse()
                .map_err(|_| format!("bad gid for {who} in /etc/passwd"))?,
            name: f[0].to_string(),
            home: f[5].to_string(),
            shell: f[6].to_string(),
            groups: vec![],
        },
        (None, Some(uid)) => User {
            uid,
            gid: uid,
            name: uid.to_string(),
            home: "/".into(),
            shell: "/bin/sh".into(),
            groups: vec![],
        },
        (None, None) => return Err(format!("no user {who:?} in the sandbox's /etc/passwd")),
    };
    if let Some(g) = gid_override {
        user.gid = g;
    }
    user.groups = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4 && f[3].split(',').any(|m| m == user.name))
        .filter_map(|f| f[2].parse().ok())
        .collect();
    user.groups.push(user.gid);
    Ok(user)
}

/// The environment of a process: defaults for `user`, then `extra`
/// (`KEY=VALUE`, which override them).
pub fn environment(user: &User, hostname: &str, tty: bool, extra: &[String]) -> Vec<String> {
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), user.home.clone()),
        ("USER".into(), user.name.clone()),
        ("LOGNAME".into(), user.name.clone()),
        ("SHELL".into(), user.shell.clone()),
        ("LANG".into(), "C.UTF-8".into()),
        ("HOSTNAME".into(), hostname.to_string()),
    ];
    if tty {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    for kv in extra {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        env.retain(|(ek, _)| ek != k);
        env.push((k.to_string(), v.to_string()));
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// `argv0` looked up in the `PATH` of `env`, as execvp would.
pub fn find_program(argv0: &str, env: &[String]) -> Option<String> {
    if argv0.contains('/') {
        return Some(argv0.to_string());
    }
    let path = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or("/usr/bin:/bin");
    path.split(':')
        .map(|dir| format!("{dir}/{argv0}"))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/bash\nagent:x:1000:1000::/home/agent:/bin/bash\n";
    const GROUP: &str = "root:x:0:\nsudo:x:27:agent\nagent:x:1000:\n";

    #[test]
    fn users_resolve_by_name_number_and_pair() {
        let agent = User {
            uid: 1000,
            gid: 1000,
            name: "agent".into(),
            home: "/home/agent".into(),
            shell: "/bin/bash".into(),
            groups: vec![27, 1000],
        };
        assert_eq!(resolve_user(None, PASSWD, GROUP), Ok(agent.clone()));
        assert_eq!(resolve_user(Some("1000"), PASSWD, GROUP), Ok(agent.clone()));
        let mut with_gid = agent;
        with_gid.gid = 5;
        with_gid.groups = vec![27, 5];
        assert_eq!(resolve_user(Some("agent:5"), PASSWD, GROUP), Ok(with_gid));
        assert_eq!(
            resolve_user(Some("4242"), PASSWD, GROUP),
            Ok(User {
                uid: 4242,
                gid: 4242,
                name: "4242".into(),
                home: "/".into(),
                shell: "/bin/sh".into(),
                groups: vec![4242],
            })
        );
        assert!(resolve_user(Some("nobody-here"), PASSWD, GROUP).is_err());
    }

    #[test]
    fn extra_environment_overrides_the_defaults() {
        let root = resolve_user(Some("root"), PASSWD, GROUP).unwrap_or_else(|e| panic!("{e}"));
        let env = environment(&root, "box", false, &["HOME=/tmp".into(), "X=1".into()]);
        assert_eq!(
            env,
            vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "USER=root",
                "LOGNAME=root",
                "SHELL=/bin/bash",
                "LANG=C.UTF-8",
                "HOSTNAME=box",
                "HOME=/tmp",
                "X=1",
            ]
        );
    }
}
