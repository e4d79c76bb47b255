//! The OCI runtime spec (`config.json`) that runsc starts a sandbox from.
//! Its paths are the host sides that `gvisor::run` prepared in the stage.

use std::path::Path;

use serde_json::{json, Value};

use super::guest;
use crate::spec::SandboxSpec;

/// Capabilities of root inside, as the namespace tier keeps them
/// (`init::KEPT_CAPS`), by the names OCI uses.
pub(crate) const KEPT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
];

/// The container's own process: the guest helper as init, with nothing.
pub(crate) fn config(spec: &SandboxSpec, stage: &Path, shm_size: u64) -> Value {
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "nodev", "mode=1777", format!("size={}k", shm_size.div_ceil(1024).max(1))]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": guest::GUEST_DIR, "type": "bind",
               "source": stage.join("guest"),
               "options": ["rbind", "ro", "nosuid", "nodev"]}),
    ];
    for (i, ws) in spec.workspaces.iter().enumerate() {
        mounts.push(json!({
            "destination": ws.target,
            "type": "bind",
            "source": stage.join(format!("ws{i}")),
            "options": ["rbind", if ws.read_only { "ro" } else { "rw" }, "nosuid", "nodev"],
        }));
    }
    for (i, file) in spec.files.iter().enumerate() {
        mounts.push(json!({
            "destination": file.target,
            "type": "bind",
            "source": stage.join(format!("file{i}")),
            "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
        }));
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": [guest::HELPER, "init"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {"bounding": [], "effective": [], "permitted": []},
            // runsc gives every process it execs this setting too; the
            // helper sets it per process where the configuration says so.
            "noNewPrivileges": false,
        },
        "root": {"path": stage.join("root"), "readonly": false},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            // No network namespace here: runsc's sandbox stays in the one
            // init made, with its loopback and moat's doors.
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
        },
    })
}

/// The spec of one process that `runsc exec` starts: the guest helper as
/// root, with moat's capabilities and CAP_SYS_ADMIN (for the filters,
/// which it then leaves behind), starting `argv` as `user`.
pub(crate) fn exec_process(
    argv: &[String],
    helper_args: Vec<String>,
    tty: bool,
    rows: u16,
    cols: u16,
) -> Value {
    let mut caps: Vec<&str> = KEPT_CAPS.to_vec();
    caps.push("CAP_SYS_ADMIN");
    let mut args = vec![guest::HELPER.to_string(), "exec".into()];
    args.extend(helper_args);
    args.push("--".into());
    args.extend(argv.iter().cloned());
    let mut process = json!({
        "terminal": tty,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "cwd": "/",
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
    });
    if tty {
        process["consoleSize"] = json!({"height": rows, "width": cols});
    }
    process
}
