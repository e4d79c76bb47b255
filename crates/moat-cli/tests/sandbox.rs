//! End-to-end: the sandbox lifecycle through the real binary and daemon.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::json;

#[test]
fn exec_keeps_streams_apart_and_propagates_the_exit_code() {
    let sb = Sandbox::new("streams");
    let out = sb.sh("echo out; echo err >&2; exit 3");
    assert_eq!(
        (text(&out.stdout), text(&out.stderr), out.status.code()),
        ("out\n".into(), "err\n".into(), Some(3))
    );
    let out = moat(&["sandbox", "exec", &sb.name, "python3", "-c", "print(1)"]);
    assert_eq!(
        (text(&out.stdout), out.status.code()),
        ("1\n".into(), Some(0))
    );
    let out = moat(&["sandbox", "exec", &sb.name, "no-such-command"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn processes_run_as_agent_in_the_workspace_with_the_sandbox_hostname() {
    let sb = Sandbox::new("whoami");
    let out = sb.sh("id -un; id -u; pwd; hostname; sudo -n id -u");
    let ws = std::fs::canonicalize(sb.ws()).unwrap();
    assert_eq!(
        text(&out.stdout),
        format!("agent\n1000\n{}\n{}\n0\n", ws.display(), sb.name)
    );
    // What the agent writes in the workspace belongs to the workspace's owner on the host.
    assert!(sb.sh("echo hi > made-inside").status.success());
    let meta = std::fs::metadata(sb.ws().join("made-inside")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        nix::unistd::geteuid().as_raw()
    );
}

#[test]
fn exec_flags_env_user_workdir_and_stdin() {
    let sb = Sandbox::new("flags");
    let env_file = sb.ws().join("vars.env");
    std::fs::write(&env_file, "# comment\nFROM_FILE=yes\n").unwrap();
    let out = moat(&[
        "sandbox",
        "exec",
        "-e",
        "A=1",
        "--env-file",
        env_file.to_str().unwrap(),
        "-u",
        "root",
        "-w",
        "/tmp",
        &sb.name,
        "sh",
        "-c",
        "echo $A $FROM_FILE $(id -u) $(pwd)",
    ]);
    assert_eq!(text(&out.stdout), "1 yes 0 /tmp\n");
    let mut child = moat_cmd()
        .args(["sandbox", "exec", "-i", &sb.name, "tr", "a-z", "A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "HELLO\n");
    // Without -i the process reads nothing.
    let out = moat(&["sandbox", "exec", &sb.name, "cat"]);
    assert_eq!(
        (text(&out.stdout), out.status.code()),
        (String::new(), Some(0))
    );
}

#[test]
fn ls_inspect_stop_run_and_rm() {
    let sb = Sandbox::new("life");
    let ws = std::fs::canonicalize(sb.ws())
        .unwrap()
        .display()
        .to_string();
    let info = sb.inspect();
    assert_eq!(
        json!({"name": info["name"], "agent": info["agent"], "status": info["status"], "template": info["template"], "workspaces": info["workspaces"]}),
        json!({"name": sb.name, "agent": "shell", "status": "running", "template": "moat/shell:latest", "workspaces": [{"path": ws, "read_only": false}]})
    );
    let table = moat_ok(&["sandbox", "ls"]);
    assert!(table.starts_with("SANDBOX"), "{table}");
    let line = table.lines().find(|l| l.starts_with(&sb.name)).unwrap();
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>(),
        vec![
            sb.name.as_str(),
            "shell",
            "running",
            "namespaces",
            ws.as_str()
        ]
    );
    assert!(moat_ok(&["sandbox", "ls", "-q"])
        .lines()
        .any(|l| l == sb.name));

    // The sandbox's own layer survives stop and run.
    assert!(sb
        .root_sh("echo kept > /etc/marker && rm /etc/motd")
        .status
        .success());
    moat_ok(&["sandbox", "stop", &sb.name]);
    assert_eq!(sb.inspect()["status"], "stopped");
    let out = sb.sh("true");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("is stopped; start it with `moat sandbox run"),
        "{}",
        text(&out.stderr)
    );
    let out = moat(&[
        "sandbox",
        "run",
        &sb.name,
        "--",
        "-c",
        "cat /etc/marker; test -e /etc/motd || echo gone",
    ]);
    assert_eq!(text(&out.stdout), "kept\ngone\n", "{}", text(&out.stderr));
    assert_eq!(sb.inspect()["status"], "running");

    // rm of a running sandbox stops it and leaves no process behind.
    let pid = sb.init_pid();
    assert!(sb
        .sh("setsid sleep 1000 >/dev/null 2>&1 &")
        .status
        .success());
    assert!(pids_in_sandbox(pid).len() >= 2);
    moat_ok(&["sandbox", "rm", &sb.name]);
    assert_eq!(pids_in_sandbox(pid), Vec::<i32>::new());
    assert!(!moat_ok(&["sandbox", "ls", "-q"])
        .lines()
        .any(|l| l == sb.name));
}

#[test]
fn default_names_and_run_is_idempotent_per_workspace() {
    ensure_template();
    let parent = tempfile::tempdir_in("/tmp").unwrap();
    let dir_name = unique("Proj");
    let ws = parent.path().join(&dir_name);
    std::fs::create_dir(&ws).unwrap();
    let w = ws.to_str().unwrap();
    let first = moat_ok(&["sandbox", "create", "-q", "shell", w])
        .trim()
        .to_string();
    let second = moat_ok(&["sandbox", "create", "-q", "shell", w])
        .trim()
        .to_string();
    let stem = format!("shell-{}", dir_name.to_lowercase());
    assert_eq!(
        (first.as_str(), second.as_str()),
        (stem.as_str(), format!("{stem}-2").as_str())
    );
    moat_ok(&["sandbox", "rm", &second]);

    // `run AGENT WORKSPACE` reuses the sandbox of that agent on that workspace.
    let out = moat(&["sandbox", "run", "shell", w, "--", "-c", "hostname"]);
    assert_eq!(
        text(&out.stdout),
        format!("{first}\n"),
        "{}",
        text(&out.stderr)
    );
    let count = moat_ok(&["sandbox", "ls", "-q"])
        .lines()
        .filter(|l| l.starts_with(&stem))
        .count();
    assert_eq!(count, 1);
    moat_ok(&["sandbox", "rm", &first]);
}

#[test]
fn bad_input_gets_one_line_errors_and_changes_nothing() {
    ensure_template();
    let ws = tempfile::tempdir_in("/tmp").unwrap();
    let w = ws.path().to_str().unwrap();
    let w_canon = std::fs::canonicalize(ws.path())
        .unwrap()
        .display()
        .to_string();
    // Other tests create sandboxes meanwhile: look only for ones on these paths.
    let on_our_paths = || -> Vec<String> {
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&moat_ok(&["sandbox", "ls", "--json"])).unwrap();
        list.iter()
            .filter(|s| {
                s["workspaces"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|w| w["path"] == w_canon || w["path"] == "/nonexistent/dir")
            })
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["sandbox", "create", "shell", "/nonexistent/dir"],
            "does not exist",
        ),
        (
            vec!["sandbox", "create", "--name", "bad name", "shell", w],
            "bad sandbox name",
        ),
        (
            vec!["sandbox", "create", "-t", "no-such-template", "shell", w],
            "unknown template or image",
        ),
        (
            vec!["sandbox", "create", "no-such-agent", w],
            "unknown agent",
        ),
        (
            vec!["sandbox", "exec", "no-such-sandbox", "true"],
            "no sandbox named",
        ),
        (vec!["sandbox", "rm", "no-such-sandbox"], "no sandbox named"),
        (
            vec!["sandbox", "ports", "x", "--publish", "a:b"],
            "bad port mapping",
        ),
    ];
    for (args, want) in cases {
        let out = moat(&args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    assert_eq!(on_our_paths(), Vec::<String>::new());

    let sb = Sandbox::new("taken");
    let out = moat(&["sandbox", "create", "--name", &sb.name, "shell", w]);
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    ensure_template();
    let out = moat(&["daemon"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("another moat daemon is already running"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn published_ports_reach_a_server_inside() {
    let sb = Sandbox::new("ports");
    std::fs::write(sb.ws().join("index.html"), "hello from inside\n").unwrap();
    let port = free_port();
    moat_ok(&[
        "sandbox",
        "exec",
        "-d",
        &sb.name,
        "python3",
        "-m",
        "http.server",
        "8000",
        "--bind",
        "127.0.0.1",
    ]);
    moat_ok(&[
        "sandbox",
        "ports",
        &sb.name,
        "--publish",
        &format!("{port}:8000"),
    ]);
    let body = retry_get(port);
    assert_eq!(body, "hello from inside\n");
    assert_eq!(
        sb.inspect()["ports"],
        json!([{"host_port": port, "sandbox_port": 8000}])
    );
    moat_ok(&[
        "sandbox",
        "ports",
        &sb.name,
        "--unpublish",
        &port.to_string(),
    ]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

fn retry_get(port: u16) -> String {
    use std::io::{Read, Write};
    for _ in 0..300 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n");
            let mut resp = String::new();
            let _ = s.read_to_string(&mut resp);
            if let Some((_, body)) = resp.split_once("\r\n\r\n") {
                if resp.starts_with("HTTP/1.0 200") {
                    return body.to_string();
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("no answer on port {port}");
}

#[test]
fn the_daemon_can_die_and_the_next_one_adopts_running_sandboxes() {
    let _daemon = use_isolated_roots("adopt");
    let sb = Sandbox::new("adopt");
    let doomed = Sandbox::new("doomed");
    let pid = sb.init_pid();
    let doomed_pid = doomed.init_pid();
    let (_, runtime) = roots();
    let daemon_pid: i32 = std::fs::read_to_string(runtime.join("moat.lock"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // While no daemon runs, one sandbox's init dies too.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(doomed_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // The next command starts a new daemon, which tells the truth about both.
    let out = sb.sh("echo still here");
    assert_eq!(text(&out.stdout), "still here\n", "{}", text(&out.stderr));
    assert_eq!(
        (sb.inspect()["status"].clone(), sb.init_pid()),
        (json!("running"), pid)
    );
    assert_eq!(doomed.inspect()["status"], "stopped");
}
