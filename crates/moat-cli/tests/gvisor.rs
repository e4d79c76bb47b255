//! End-to-end: the gVisor tier (`--isolation gvisor`) through the real
//! binary, daemon and runsc: the same sandbox as the namespace tier's, with
//! gVisor's kernel between it and the host's. As root, and once rootless.
//!
//! Needs gVisor's `runsc` on `PATH` (Debian's `runsc` package).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::rootless::Rootless;
use common::tmux::{tmux, Session};
use common::*;
use serde_json::json;

const GVISOR: &[&str] = &["--isolation", "gvisor"];

/// A gVisor sandbox with a fresh workspace, then `extra` workspaces.
fn gvisor(prefix: &str, extra: &[&str]) -> Sandbox {
    Sandbox::create(prefix, GVISOR, extra)
}

/// A gVisor sandbox on `workspace`, which the caller prepared (its owner, say).
fn gvisor_on(prefix: &str, workspace: tempfile::TempDir, extra: &[&str]) -> Sandbox {
    ensure_template();
    let name = unique(prefix);
    let ws = workspace.path().to_str().unwrap().to_string();
    let mut args = vec!["sandbox", "create", "--name", &name];
    args.extend_from_slice(GVISOR);
    args.extend_from_slice(&["shell", &ws]);
    args.extend_from_slice(extra);
    moat_ok(&args);
    Sandbox {
        name,
        workspace,
        rootless: None,
    }
}

fn workspace() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("moat-ws-")
        .tempdir_in("/tmp")
        .unwrap()
}

/// stdout, insisting on exit code 0.
fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

/// The lines of stderr that are errors (not warnings, not the notice that
/// a daemon started).
fn error_lines(stderr: &[u8]) -> Vec<String> {
    text(stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains("warning:") && !l.contains("started the daemon"))
        .map(str::to_string)
        .collect()
}

/// GET `path` from the host's 127.0.0.1:`port` until it answers 200 (up to 30 s).
fn get_until_ok(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes());
            let mut resp = String::new();
            let _ = s.read_to_string(&mut resp);
            if resp.starts_with("HTTP/1.0 200") {
                if let Some((_, body)) = resp.split_once("\r\n\r\n") {
                    return body.to_string();
                }
            }
        }
        assert!(Instant::now() < deadline, "no answer on port {port}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts `python3 -m http.server PORT` inside, detached, serving the
/// workspace, and publishes it on a free host port, which it returns.
fn serve_and_publish(sb: &Sandbox, inside: u16) -> u16 {
    moat_ok(&[
        "sandbox",
        "exec",
        "-d",
        &sb.name,
        "python3",
        "-m",
        "http.server",
        &inside.to_string(),
        "--bind",
        "127.0.0.1",
    ]);
    let port = free_port();
    moat_ok(&[
        "sandbox",
        "ports",
        &sb.name,
        "--publish",
        &format!("{port}:{inside}"),
    ]);
    port
}

/// The host processes of a sandbox: those in its user namespace (init,
/// runsc's gofer and sandbox, every `runsc exec`) and any whose command
/// line names its id (runsc's sandbox process does). `userns` is the
/// namespace's link, read while the sandbox ran.
fn host_processes(userns: &str, id: &str) -> Vec<(i32, String)> {
    let mut out = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/user"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| text(&b).replace('\0', " "))
            .unwrap_or_default();
        if ns == userns || cmdline.split(' ').any(|a| a == id) {
            out.push((pid, cmdline));
        }
    }
    out
}

fn userns_of(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/user"))
        .unwrap()
        .display()
        .to_string()
}

/// Waits (up to 20 s) until none of the sandbox's processes is left.
fn wait_until_gone(userns: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = host_processes(userns, id);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes of sandbox {id} are left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_gvisor_sandbox_is_listed_inspected_and_runs_commands_as_asked() {
    let sb = gvisor("gv-basic", &[]);
    let ws = std::fs::canonicalize(sb.ws())
        .unwrap()
        .display()
        .to_string();

    let table = moat_ok(&["sandbox", "ls"]);
    assert!(table.starts_with("SANDBOX"), "{table}");
    assert!(
        table.lines().next().unwrap().contains("ISOLATION"),
        "{table}"
    );
    let line = table.lines().find(|l| l.starts_with(&sb.name)).unwrap();
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>(),
        vec![sb.name.as_str(), "shell", "running", "gvisor", ws.as_str()]
    );

    let info = sb.inspect();
    let iso = &info["isolation"];
    assert_eq!(iso["tier"], "gvisor", "{info:#}");
    let runsc = iso["runsc"].as_str().unwrap_or_default();
    assert!(runsc.contains("runsc version"), "{iso:#}");
    let platform = iso["platform"].as_str().unwrap_or_default();
    assert!(["systrap", "ptrace", "kvm"].contains(&platform), "{iso:#}");
    let walls: Vec<(&str, bool)> = iso["walls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["name"].as_str().unwrap(), w["up"].as_bool().unwrap()))
        .collect();
    for want in ["gVisor", "seccomp", "user namespace"] {
        assert!(walls.contains(&(want, true)), "{want} is not up: {iso:#}");
    }
    let gvisor_wall = iso["walls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "gVisor")
        .unwrap();
    assert!(
        gvisor_wall["detail"].as_str().unwrap().contains(platform),
        "{iso:#}"
    );

    // As agent and as root inside; the streams apart, the exit code back.
    assert_eq!(
        ok(sb.sh("id -un; id -u; pwd; hostname")),
        format!("agent\n1000\n{ws}\n{}\n", sb.name)
    );
    assert_eq!(ok(sb.root_sh("id -un; id -u")), "root\n0\n");
    let out = sb.sh("echo out; echo err >&2; exit 7");
    assert_eq!(
        (text(&out.stdout), text(&out.stderr), out.status.code()),
        ("out\n".into(), "err\n".into(), Some(7))
    );
    let out = moat(&["sandbox", "exec", &sb.name, "no-such-command"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not found"),
        "{}",
        text(&out.stderr)
    );
    let out = moat(&[
        "sandbox",
        "exec",
        "-e",
        "A=1",
        "-w",
        "/tmp",
        &sb.name,
        "sh",
        "-c",
        "echo $A $(pwd)",
    ]);
    assert_eq!(ok(out), "1 /tmp\n");

    // stdin with -i; without it the process reads nothing.
    let out = run_with_stdin(
        moat_cmd().args(["sandbox", "exec", "-i", &sb.name, "tr", "a-z", "A-Z"]),
        b"hello from the host\n",
    );
    assert_eq!(ok(out), "HELLO FROM THE HOST\n");
    assert_eq!(ok(moat(&["sandbox", "exec", &sb.name, "cat"])), "");

    // A terminal: `script` gives the CLI one, of a size set beforehand.
    let (state, runtime) = roots();
    let out = Command::new("timeout")
        .args(["120", "script", "-qec"])
        .arg(format!(
            "stty rows 33 cols 111; {BIN} sandbox exec -t {} sh -c 'test -t 0 && test -t 1 && echo TTY-yes; stty size; exit 4'",
            sb.name
        ))
        .arg("/dev/null")
        .env("MOAT_HOME", &state)
        .env("MOAT_RUNTIME_DIR", &runtime)
        .env_remove("MOAT_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = text(&out.stdout).replace('\r', "");
    assert!(
        said.contains("TTY-yes\n33 111\n"),
        "{said}{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(4), "{said}");
}

/// A terminal as a person uses it, from tmux: the size follows resizes,
/// Ctrl-C reaches the process inside, closing the terminal ends what runs
/// in it, and the exit code comes back.
#[test]
fn a_gvisor_terminal_passes_resizes_ctrl_c_hangups_and_the_exit_code() {
    let sb = gvisor("gv-tty", &[]);
    let (state, runtime) = roots();
    let session = unique("moat-gvtty");
    let exit_file = sb.ws().join("exit-code");
    let command = format!(
        "env MOAT_HOME={} MOAT_RUNTIME_DIR={} {BIN} sandbox exec -it {} bash --norc; echo EXIT=$? > {}; sleep 60",
        state.display(),
        runtime.display(),
        sb.name,
        exit_file.display()
    );
    let tty = Session::start(&session, 100, 30, &command);
    tty.send(&["PS1='moat-prompt$ '; stty size", "Enter"]);
    tty.wait_for("30 100", Duration::from_secs(60));

    tmux(&["resize-window", "-t", &session, "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(500));
    tty.send(&["clear; stty size", "Enter"]);
    tty.wait_for("40 120", Duration::from_secs(30));

    tty.send(&["sleep 1000", "Enter"]);
    std::thread::sleep(Duration::from_secs(1));
    tty.send(&["C-c", ""]);
    tty.send(&["echo after-$((40+2))", "Enter"]);
    tty.wait_for("after-42", Duration::from_secs(30));

    tty.send(&["exit 5", "Enter"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !exit_file.exists() {
        assert!(Instant::now() < deadline, "the exec never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(std::fs::read_to_string(&exit_file).unwrap(), "EXIT=5\n");
    drop(tty);

    // A terminal that goes away takes what runs in it along (SIGHUP).
    let session = unique("moat-gvtty");
    let command = format!(
        "env MOAT_HOME={} MOAT_RUNTIME_DIR={} {BIN} sandbox exec -it {} bash --norc",
        state.display(),
        runtime.display(),
        sb.name,
    );
    let tty = Session::start(&session, 100, 30, &command);
    tty.send(&["PS1='moat-prompt$ '", "Enter"]);
    tty.wait_for("moat-prompt$", Duration::from_secs(60));
    tty.send(&["sleep 4321", "Enter"]);
    let running = || text(&sb.sh("ps -eo args").stdout).contains("sleep 4321");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !running() {
        assert!(Instant::now() < deadline, "sleep never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(tty);
    let deadline = Instant::now() + Duration::from_secs(30);
    while running() {
        assert!(
            Instant::now() < deadline,
            "the terminal closed but its process runs on: {}",
            text(&sb.sh("ps -eo pid,args").stdout)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn workspaces_keep_their_owner_and_read_only_ones_refuse_writes() {
    let ws = workspace();
    nix::unistd::chown(
        ws.path(),
        Some(nix::unistd::Uid::from_raw(4321)),
        Some(nix::unistd::Gid::from_raw(4321)),
    )
    .unwrap();
    let ro = workspace();
    std::fs::write(ro.path().join("given.txt"), "given\n").unwrap();
    std::fs::set_permissions(ro.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ro_path = std::fs::canonicalize(ro.path()).unwrap();
    let ro_arg = format!("{}:ro", ro_path.display());
    let sb = gvisor_on("gv-owner", ws, &[&ro_arg]);

    // Inside, the workspace is the agent's.
    assert_eq!(ok(sb.sh("stat -c '%U %G' .")), "agent agent\n");
    // What the agent writes belongs to the workspace's owner on the host.
    assert_eq!(
        ok(sb.sh("echo hi > made && mkdir dir && echo there > dir/deeper && cat made")),
        "hi\n"
    );
    for made in ["made", "dir", "dir/deeper"] {
        let meta = std::fs::metadata(sb.ws().join(made)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4321, 4321), "{made}");
    }
    assert_eq!(
        std::fs::read_to_string(sb.ws().join("dir/deeper")).unwrap(),
        "there\n"
    );
    // What the host writes there, the agent sees at once.
    std::fs::write(sb.ws().join("from-host"), "from the host\n").unwrap();
    assert_eq!(ok(sb.sh("cat from-host")), "from the host\n");

    // The read-only workspace is read, never written, not even by root.
    let ro_in = ro_path.display().to_string();
    assert_eq!(ok(sb.sh(&format!("cat {ro_in}/given.txt"))), "given\n");
    for out in [
        sb.sh(&format!("echo x > {ro_in}/new")),
        sb.root_sh(&format!("echo x > {ro_in}/new")),
        sb.root_sh(&format!("rm {ro_in}/given.txt")),
    ] {
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains("Read-only file system") || err.contains("Permission denied"),
            "{err}"
        );
    }
    assert!(!ro.path().join("new").exists());
    assert!(ro.path().join("given.txt").exists());
    let list = sb.inspect()["workspaces"].clone();
    assert_eq!(list[1], json!({"path": ro_in, "read_only": true}));
}

/// Debian 12's coreutils call statx with AT_NO_AUTOMOUNT, which gVisor
/// releases before 2024 refuse; moat's guest helper works around it.
#[test]
fn ls_l_and_stat_work() {
    let sb = gvisor("gv-stat", &[]);
    std::fs::write(sb.ws().join("file"), "12345").unwrap();
    let listing = ok(sb.sh("ls -l /"));
    assert!(listing.contains("bin -> usr/bin"), "{listing}");
    assert!(listing.lines().any(|l| l.ends_with(" etc")), "{listing}");
    assert_eq!(
        ok(sb.sh("stat -c '%a %U %G' /etc/passwd")),
        "644 root root\n"
    );
    assert_eq!(
        ok(sb.sh("stat -c %s /etc/passwd")),
        ok(sb.sh("wc -c < /etc/passwd"))
    );
    assert!(ok(sb.sh("stat /etc/passwd")).contains("File: /etc/passwd"));
    assert!(
        ok(sb.sh("ls -l file")).contains(" 5 "),
        "ls -l of a workspace file"
    );
    assert_eq!(ok(sb.sh("stat -c %s file")), "5\n");
    // Programs that call statx themselves, without the C library.
    assert_eq!(
        ok(sb.sh(
            "python3 -c 'import os; print(os.stat(\"/etc/passwd\").st_mode & 0o777 == 0o644)'"
        )),
        "True\n"
    );
}

#[test]
fn the_gateway_blocks_and_logs_and_the_model_runner_door_answers() {
    let sb = gvisor("gv-doors", &[]);
    assert_eq!(
        ok(sb.sh("echo $HTTP_PROXY; echo $HTTPS_PROXY")),
        "http://host.docker.internal:3128\nhttp://host.docker.internal:3128\n"
    );
    // The host's loopback is closed by the default policy: moat's gateway
    // says so, and logs it.
    let port = free_port();
    let out = sb.sh(&format!(
        "curl -s -w '\\n%{{http_code}}' http://host.docker.internal:{port}/nothing"
    ));
    let body = text(&out.stdout);
    assert!(body.ends_with("\n403"), "{body}{}", text(&out.stderr));
    assert!(
        body.contains(&format!(
            "localhost:{port} is blocked for sandbox {}",
            sb.name
        )),
        "{body}"
    );
    let mut rows: Vec<serde_json::Value> = vec![];
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the blocked request is not logged"
        );
        std::thread::sleep(Duration::from_millis(100));
        rows = serde_json::from_str(&moat_ok(&["sandbox", "network", "log", &sb.name, "--json"]))
            .unwrap();
    }
    assert_eq!(
        json!({"sandbox": rows[0]["sandbox"], "host": rows[0]["host"], "port": rows[0]["port"],
               "decision": rows[0]["decision"], "status": rows[0]["status"], "path": rows[0]["path"]}),
        json!({"sandbox": sb.name, "host": "localhost", "port": port,
               "decision": "blocked", "status": 403, "path": "/nothing"})
    );
    let table = moat_ok(&["sandbox", "network", "log", &sb.name]);
    assert!(
        table.contains(&format!("localhost:{port}")) && table.contains("<default policy>"),
        "{table}"
    );

    // HTTPS goes through the gateway too: it refuses the tunnel.
    let out = sb.sh(&format!(
        "curl -s -o /dev/null -w '%{{http_connect}}' https://host.docker.internal:{port}/"
    ));
    assert_eq!(text(&out.stdout), "403", "{}", text(&out.stderr));

    // Around the gateway there is no way out: the host's loopback is not
    // the sandbox's, and nothing else is routed.
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host.local_addr().unwrap().port();
    for url in [
        format!("http://127.0.0.1:{host_port}/"),
        "http://10.0.2.2/".to_string(),
        "http://1.1.1.1/".to_string(),
    ] {
        let out = sb.sh(&format!(
            "curl --noproxy '*' -s -o /dev/null --max-time 10 -w '%{{http_code}}' {url}"
        ));
        assert!(
            !out.status.success(),
            "{url} answered: {}",
            text(&out.stdout)
        );
        assert_eq!(text(&out.stdout), "000", "{url}");
    }

    // The model runner's door, on the sandbox's loopback, as in the namespace tier.
    let out = sb.sh("curl -s --max-time 30 http://127.0.0.1:12434/");
    assert!(
        text(&out.stdout).contains("The moat model runner is running"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn a_published_port_reaches_a_server_inside() {
    let sb = gvisor("gv-ports", &[]);
    std::fs::write(sb.ws().join("index.html"), "hello from gVisor\n").unwrap();
    let port = serve_and_publish(&sb, 3000);
    assert_eq!(get_until_ok(port, "/index.html"), "hello from gVisor\n");
    assert_eq!(
        sb.inspect()["ports"],
        json!([{"host_port": port, "sandbox_port": 3000}])
    );
    moat_ok(&[
        "sandbox",
        "ports",
        &sb.name,
        "--unpublish",
        &port.to_string(),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn stop_ends_every_process_and_run_starts_it_again_with_its_files() {
    let sb = gvisor("gv-stop", &[]);
    let id = sb.inspect()["id"].as_str().unwrap().to_string();
    assert!(sb.sh("echo kept > in-workspace").status.success());
    assert!(sb.root_sh("echo layer > /etc/marker").status.success());
    assert!(sb
        .sh("setsid sleep 1000 >/dev/null 2>&1 < /dev/null &")
        .status
        .success());
    let userns = userns_of(sb.init_pid());
    let before = host_processes(&userns, &id);
    assert!(
        before.iter().any(|(_, c)| c.contains("runsc-sandbox")),
        "no runsc sandbox process among {before:?}"
    );
    assert!(
        before.iter().any(|(_, c)| c.contains("runsc-gofer")),
        "no runsc gofer among {before:?}"
    );

    moat_ok(&["sandbox", "stop", &sb.name]);
    assert_eq!(sb.inspect()["status"], "stopped");
    wait_until_gone(&userns, &id);
    let out = sb.sh("true");
    assert_eq!(out.status.code(), Some(125));

    let out = moat(&[
        "sandbox",
        "run",
        &sb.name,
        "--",
        "-c",
        "echo again; cat in-workspace /etc/marker",
    ]);
    assert_eq!(
        text(&out.stdout),
        "again\nkept\nlayer\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(sb.inspect()["status"], "running");
    assert_eq!(sb.inspect()["isolation"]["tier"], "gvisor");
    assert_eq!(ok(sb.sh("id -u; cat /etc/marker")), "1000\nlayer\n");

    // rm of a running sandbox leaves nothing either.
    let userns = userns_of(sb.init_pid());
    moat_ok(&["sandbox", "rm", &sb.name]);
    wait_until_gone(&userns, &id);
    assert!(!moat_ok(&["sandbox", "ls", "-q"])
        .lines()
        .any(|l| l == sb.name));
}

#[test]
fn the_next_daemon_adopts_a_running_gvisor_sandbox() {
    let _daemon = use_isolated_roots("gvisor-adopt");
    let sb = gvisor("gv-adopt", &[]);
    std::fs::write(sb.ws().join("index.html"), "still served\n").unwrap();
    let port = serve_and_publish(&sb, 3000);
    assert_eq!(get_until_ok(port, "/index.html"), "still served\n");
    let pid = sb.init_pid();

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
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{daemon_pid}")).exists() {
        assert!(Instant::now() < deadline, "the daemon did not die");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The next command starts a daemon, which adopts the sandbox.
    let out = sb.sh("echo still here; id -u");
    assert_eq!(
        text(&out.stdout),
        "still here\n1000\n",
        "{}",
        text(&out.stderr)
    );
    let info = sb.inspect();
    assert_eq!(
        (
            info["status"].clone(),
            info["pid"].clone(),
            info["isolation"]["tier"].clone()
        ),
        (json!("running"), json!(pid), json!("gvisor"))
    );
    assert_eq!(get_until_ok(port, "/index.html"), "still served\n");
    // And it still relays stdin.
    let out = run_with_stdin(
        moat_cmd().args(["sandbox", "exec", "-i", &sb.name, "wc", "-c"]),
        b"12345",
    );
    assert_eq!(ok(out).trim(), "5");
    moat_ok(&["sandbox", "stop", &sb.name]);
    assert_eq!(sb.inspect()["status"], "stopped");
}

#[test]
fn a_gvisor_sandbox_is_saved_as_an_image() {
    let sb = gvisor("gv-save", &[]);
    assert!(sb
        .root_sh("echo saved > /etc/gvisor-saved && rm /etc/motd")
        .status
        .success());
    let reference = format!("gvisor/{}:v1", unique("saved"));
    // While it runs (paused meanwhile), then stopped.
    let id = moat_ok(&["sandbox", "save", &sb.name, &reference]);
    assert!(id.trim().starts_with("sha256:"), "{id}");
    assert_eq!(ok(sb.sh("cat /etc/gvisor-saved")), "saved\n", "it runs on");
    let listed = moat_ok(&["image", "ls", "-q"]);
    assert!(listed.lines().any(|l| l == reference), "{listed}");

    // A sandbox of the image, of either tier, has the change.
    for flags in [GVISOR, &[][..]] {
        let mut args = vec!["-t", reference.as_str()];
        args.extend_from_slice(flags);
        let copy = Sandbox::create("gv-saved-copy", &args, &[]);
        assert_eq!(
            ok(copy.sh("cat /etc/gvisor-saved; test -e /etc/motd || echo gone")),
            "saved\ngone\n"
        );
    }

    moat_ok(&["sandbox", "stop", &sb.name]);
    let stopped_ref = format!("gvisor/{}:v1", unique("saved-stopped"));
    moat_ok(&["sandbox", "save", &sb.name, &stopped_ref]);
    assert!(moat_ok(&["image", "ls", "-q"])
        .lines()
        .any(|l| l == stopped_ref));
    moat_ok(&["image", "rm", &reference, &stopped_ref]);
}

#[test]
fn an_unknown_tier_is_refused_in_one_line() {
    ensure_template();
    let ws = workspace();
    let name = unique("gv-vm");
    let out = moat(&[
        "sandbox",
        "create",
        "--name",
        &name,
        "--isolation",
        "vm",
        "shell",
        ws.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = error_lines(&out.stderr);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("namespaces, gvisor"), "{err:?}");
    assert!(!moat_ok(&["sandbox", "ls", "-q"]).lines().any(|l| l == name));
}

#[test]
fn a_missing_runsc_is_reported_in_one_line_and_makes_no_sandbox() {
    let _daemon = fresh_isolated_roots("gvisor-no-runsc");
    start_daemon_with(&[("MOAT_SANDBOX_RUNSC", "/nonexistent/runsc".as_ref())]);
    ensure_template();
    let ws = workspace();
    let name = unique("gv-norunsc");
    let out = moat(&[
        "sandbox",
        "create",
        "--name",
        &name,
        "--isolation",
        "gvisor",
        "shell",
        ws.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = error_lines(&out.stderr);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("/nonexistent/runsc") && err[0].contains("sandbox.runsc"),
        "{err:?}"
    );
    assert_eq!(moat_ok(&["sandbox", "ls", "-q"]), "");
    let (state, _) = roots();
    assert_eq!(entries(&state.join("sandboxes")), Vec::<String>::new());
    // The namespace tier does not need runsc.
    let sb = Sandbox::new("gv-norunsc-ns");
    assert_eq!(sb.inspect()["isolation"]["tier"], "namespaces");
    assert_eq!(ok(sb.sh("id -u")), "1000\n");
}

/// The names in `dir`, none where it is missing.
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Init processes (`moat-init`) whose parent is `daemon`.
fn inits_of(daemon: i32) -> Vec<i32> {
    let mut out = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …: comm may hold spaces, so split after it.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let ppid: i32 = rest.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == daemon && text(&cmdline).starts_with("moat-init") {
            out.push(pid);
        }
    }
    out
}

/// A runsc at `dir/runsc` (`dir` gets `mode`) that answers `--version` as
/// a 2024 release does and fails to start anything, saying why on stderr.
fn fake_runsc(dir: &Path, mode: u32) -> PathBuf {
    let fake = dir.join("runsc");
    std::fs::write(
        &fake,
        "#!/bin/sh\n\
         for a in \"$@\"; do\n\
           case \"$a\" in\n\
             --version) echo 'runsc version release-20240101.0'; exit 0;;\n\
             run) echo 'fake runsc: starting' >&2; echo 'fake runsc: cannot start' >&2; exit 1;;\n\
           esac\n\
         done\n\
         echo \"fake runsc: unexpected $*\" >&2\n\
         exit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
    fake
}

/// A runsc that the daemon can run but the sandbox's ids cannot reach (as
/// root, they are unprivileged host ids): the error says so, in one line.
#[test]
fn a_runsc_out_of_the_sandbox_ids_reach_is_named_in_one_line() {
    let _daemon = fresh_isolated_roots("gvisor-unreachable-runsc");
    let dir = tempfile::Builder::new()
        .prefix("moat-private-runsc-")
        .tempdir_in("/tmp")
        .unwrap();
    let fake = fake_runsc(dir.path(), 0o700);
    start_daemon_with(&[("MOAT_SANDBOX_RUNSC", fake.as_os_str())]);
    ensure_template();
    let ws = workspace();
    let name = unique("gv-private");
    let out = moat(&[
        "sandbox",
        "create",
        "--name",
        &name,
        "--isolation",
        "gvisor",
        "shell",
        ws.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = error_lines(&out.stderr);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains(&format!("cannot reach {}", fake.display()))
            && err[0].contains("Permission denied"),
        "{err:?}"
    );
    assert_eq!(moat_ok(&["sandbox", "ls", "-q"]), "");
}

/// A runsc that answers `--version` as a 2024 release does and fails to
/// start anything. It lies under /tmp, which a gVisor sandbox's init covers
/// with its stage: init must run it all the same.
#[test]
fn a_runsc_that_fails_shows_its_error_and_leaves_nothing_behind() {
    let _daemon = fresh_isolated_roots("gvisor-fake-runsc");
    let dir = tempfile::Builder::new()
        .prefix("moat-fake-runsc-")
        .tempdir_in("/tmp")
        .unwrap();
    // The sandbox's ids run it: everyone may.
    let fake = fake_runsc(dir.path(), 0o755);
    start_daemon_with(&[("MOAT_SANDBOX_RUNSC", fake.as_os_str())]);
    ensure_template();
    let (state, runtime) = roots();
    let daemon: i32 = std::fs::read_to_string(runtime.join("moat.lock"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let ws = workspace();
    let name = unique("gv-fake");
    let out = moat(&[
        "sandbox",
        "create",
        "--name",
        &name,
        "--isolation",
        "gvisor",
        "shell",
        ws.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = error_lines(&out.stderr);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("fake runsc: cannot start"), "{err:?}");
    assert!(
        !err[0].contains("did not start: the sandbox did not start"),
        "{err:?}"
    );

    // No sandbox, no state, no process, no mount.
    assert_eq!(moat_ok(&["sandbox", "ls", "-q"]), "");
    assert_eq!(entries(&state.join("sandboxes")), Vec::<String>::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !inits_of(daemon).is_empty() {
        assert!(
            Instant::now() < deadline,
            "inits left: {:?}",
            inits_of(daemon)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let state = state.display().to_string();
    let left: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&state)).collect();
    assert_eq!(left, Vec::<&str>::new());
}

// ----- rootless -----

/// runsc runs as root of the sandbox's user namespace, which a rootless
/// daemon makes as well as a root one: the tier works without root.
#[test]
fn an_unprivileged_user_runs_a_gvisor_sandbox() {
    let r = Rootless::setup("gv");
    let ws = r.dir.join("ws");
    let w = ws.to_str().unwrap();
    let out = r.moat(&[
        "sandbox",
        "create",
        "--name",
        "rlgv",
        "--isolation",
        "gvisor",
        "shell",
        w,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info = r.inspect("rlgv");
    assert_eq!(info["isolation"]["tier"], "gvisor", "{info:#}");
    assert!(
        info["isolation"]["walls"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["name"] == "gVisor" && w["up"] == true),
        "{info:#}"
    );

    let out = r.moat(&[
        "sandbox",
        "exec",
        "rlgv",
        "sh",
        "-c",
        "id -u; stat -c %U .; echo hi > made; ls -l / | grep -c ' bin -> usr/bin'",
    ]);
    assert_eq!(
        text(&out.stdout),
        "1000\nagent\n1\n",
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::metadata(ws.join("made")).unwrap().uid(), r.uid);
    let out = r.moat(&[
        "sandbox",
        "exec",
        "-u",
        "root",
        "rlgv",
        "sh",
        "-c",
        "id -u; echo x > /etc/rootless-layer",
    ]);
    assert_eq!(text(&out.stdout), "0\n", "{}", text(&out.stderr));

    // Stop ends every process; run starts it again with its files.
    let id = info["id"].as_str().unwrap().to_string();
    let userns = userns_of(info["pid"].as_i64().unwrap() as i32);
    r.ok(&["sandbox", "stop", "rlgv"]);
    wait_until_gone(&userns, &id);
    let out = r.moat(&[
        "sandbox",
        "run",
        "rlgv",
        "--",
        "-c",
        "cat made /etc/rootless-layer",
    ]);
    assert_eq!(text(&out.stdout), "hi\nx\n", "{}", text(&out.stderr));
    let userns = userns_of(r.inspect("rlgv")["pid"].as_i64().unwrap() as i32);
    r.ok(&["sandbox", "rm", "rlgv"]);
    wait_until_gone(&userns, &id);
    assert!(!r.dir.join("user/state/sandboxes").join(&id).exists());
}
