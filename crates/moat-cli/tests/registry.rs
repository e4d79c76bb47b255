//! End-to-end: sandboxes saved as images and moved through a real registry
//! (Debian's `docker-registry` on loopback), checked by `skopeo`, an
//! independent implementation; basic auth; broken connections; layers that
//! try to escape.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/registry.rs"]
mod registry_support;

use std::process::Command;

use common::*;
use registry_support::*;

fn skopeo(args: &[&str]) -> std::process::Output {
    Command::new("skopeo")
        .args(args)
        .output()
        .expect("skopeo is installed")
}

fn skopeo_ok(args: &[&str]) -> String {
    let out = skopeo(args);
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A Debian package made on the host, for the sandbox to install with dpkg.
fn build_deb(dir: &std::path::Path) -> std::path::PathBuf {
    let root = dir.join("pkg");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("usr/share/moat-hello")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: moat-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: moat <moat@example.com>\nDescription: a package the registry test installs\n",
    )
    .unwrap();
    std::fs::write(
        root.join("usr/share/moat-hello/greeting"),
        "hello from a saved sandbox\n",
    )
    .unwrap();
    let deb = dir.join("moat-hello.deb");
    let out = Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&root)
        .arg(&deb)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::remove_dir_all(&root).unwrap();
    deb
}

#[test]
fn a_saved_sandbox_goes_through_a_registry_and_comes_back_the_same() {
    // Its own roots: it removes every local image, the template included.
    let _daemon = use_isolated_roots("registry-roundtrip");
    let registry = Registry::start(None);
    let saved = format!("{}/me/saved:v1", registry.host());
    ensure_template();
    // What an earlier run of this test left in its roots.
    for old in moat_ok(&["image", "ls", "-q"]).lines() {
        if old != "moat/shell:latest" {
            moat_ok(&["image", "rm", old]);
        }
    }

    let sb = Sandbox::new("save");
    let deb = build_deb(sb.ws());
    let out = sb.root_sh(&format!(
        "dpkg -i {} >/dev/null && rm /etc/issue && rm -rf /etc/apt/apt.conf.d && mkdir /etc/apt/apt.conf.d && echo new > /etc/apt/apt.conf.d/99moat",
        deb.display()
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Saved while it runs: paused for the read, running again after.
    let paused = moat(&["sandbox", "save", &sb.name, &saved]);
    assert!(paused.status.success(), "{}", text(&paused.stderr));
    assert!(
        text(&paused.stderr).contains("paused"),
        "{}",
        text(&paused.stderr)
    );
    assert_eq!(text(&sb.sh("echo still here").stdout), "still here\n");

    moat_ok(&["sandbox", "stop", &sb.name]);
    moat_ok(&["sandbox", "save", &sb.name, &saved]);
    let pushed = moat(&["image", "push", &saved]);
    assert!(pushed.status.success(), "{}", text(&pushed.stderr));
    assert!(
        text(&pushed.stdout).contains("3 uploaded"),
        "{}",
        text(&pushed.stdout)
    );

    // A second implementation reads what moat pushed.
    let inspect: serde_json::Value = serde_json::from_str(&skopeo_ok(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{saved}"),
    ]))
    .unwrap();
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2);
    assert_eq!(inspect["Labels"]["dev.moat.sandbox"], sb.name.as_str());
    assert_eq!(
        inspect["Labels"]["org.opencontainers.image.base.name"],
        "moat/shell:latest"
    );
    let copy = tempfile::tempdir().unwrap();
    skopeo_ok(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{saved}"),
        &format!("oci:{}:v1", copy.path().display()),
    ]);

    // Nothing local is left: not the sandbox, the saved image or the template.
    drop(sb);
    moat_ok(&["image", "rm", &saved, "moat/shell:latest"]);
    assert_eq!(moat_ok(&["image", "ls", "-q"]), "");

    let ws = tempfile::tempdir_in("/tmp").unwrap();
    let name = unique("restored");
    let created = moat(&[
        "sandbox",
        "create",
        "--name",
        &name,
        "-t",
        &saved,
        "shell",
        ws.path().to_str().unwrap(),
    ]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let check = moat(&[
        "sandbox", "exec", &name, "sh", "-c",
        "dpkg-query -W -f '${Status}' moat-hello; echo; cat /usr/share/moat-hello/greeting; test -e /etc/issue && echo issue-is-back; ls /etc/apt/apt.conf.d",
    ]);
    assert_eq!(
        text(&check.stdout),
        "install ok installed\nhello from a saved sandbox\n99moat\n",
        "{}",
        text(&check.stderr)
    );

    // The same sandbox as an OCI archive, read by skopeo and loaded back.
    moat_ok(&["sandbox", "stop", &name]);
    let archive = ws.path().join("oc.tar");
    let archived = format!("{}/me/archived:v2", registry.host());
    moat_ok(&[
        "sandbox",
        "save",
        &name,
        &archived,
        "-o",
        archive.to_str().unwrap(),
    ]);
    assert!(!moat_ok(&["image", "ls", "-q"]).contains("archived"));
    skopeo_ok(&["inspect", &format!("oci-archive:{}", archive.display())]);
    let loaded = moat_ok(&["image", "load", "-i", archive.to_str().unwrap()]);
    assert_eq!(loaded, format!("Loaded image: {archived}\n"));
    moat_ok(&["sandbox", "rm", &name]);
    moat_ok(&["image", "rm", &archived, &saved]);
}

#[test]
fn a_registry_with_basic_auth_takes_a_push_after_login() {
    let registry = Registry::start(Some(("moat", "s3cret-pw")));
    ensure_template();
    let target = format!("{}/auth/shell:t", registry.host());
    moat_ok(&["image", "tag", "moat/shell:latest", &target]);

    let denied = moat(&["image", "push", &target]);
    assert!(!denied.status.success());
    assert!(
        text(&denied.stderr).contains("moat image login"),
        "{}",
        text(&denied.stderr)
    );

    let login = |password: &str| {
        run_with_stdin(
            moat_cmd().args([
                "image",
                "login",
                &registry.host(),
                "-u",
                "moat",
                "--password-stdin",
            ]),
            password.as_bytes(),
        )
    };
    let wrong = login("wrong");
    assert!(!wrong.status.success());
    assert!(
        text(&wrong.stderr).contains("refused"),
        "{}",
        text(&wrong.stderr)
    );
    let right = login("s3cret-pw\n");
    assert!(right.status.success(), "{}", text(&right.stderr));

    let (state, _) = roots();
    let logins = state.join("registries.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&logins).unwrap().permissions().mode() & 0o777,
        0o600
    );

    moat_ok(&["image", "push", &target]);
    skopeo_ok(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        "moat:s3cret-pw",
        &format!("docker://{target}"),
    ]);
    moat_ok(&["image", "logout", &registry.host()]);
    moat_ok(&["image", "rm", &target]);
}

#[test]
fn a_push_cut_off_halfway_completes_on_the_next_try() {
    let registry = Registry::start(None);
    ensure_template();
    let port = free_port();
    let target = format!("localhost:{port}/cut/shell:t");
    moat_ok(&["image", "tag", "moat/shell:latest", &target]);

    let relay = CuttingRelay::start(port, registry.port, 40 << 20, 0);
    let cut = moat(&["image", "push", &target]);
    assert!(!cut.status.success(), "the relay cuts after 40 MiB");
    assert!(
        text(&cut.stderr).contains("run the same command again"),
        "{}",
        text(&cut.stderr)
    );
    drop(relay);

    let _relay = CuttingRelay::start(port, registry.port, 0, 0);
    let again = moat_ok(&["image", "push", &target]);
    assert!(
        again.contains("1 uploaded, 0 mounted, 1 already there"),
        "{again}"
    );
    let inspect: serde_json::Value = serde_json::from_str(&skopeo_ok(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{target}"),
    ]))
    .unwrap();

    // The same image by digest: the manifest is checked against it.
    let digest = inspect["Digest"].as_str().unwrap();
    let by_digest = format!("localhost:{port}/cut/shell@{digest}");
    let pulled = moat_ok(&["image", "pull", &by_digest]);
    assert!(pulled.contains(digest), "{pulled}");
    let listed = moat_ok(&["image", "ls"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&format!("localhost:{port}/cut/shell "))
                && l.contains(" <none> ")),
        "{listed}"
    );
    // Another repository of the same registry: every blob is mounted, none sent.
    let elsewhere = format!("localhost:{port}/cut-copy/shell:t");
    moat_ok(&["image", "tag", &target, &elsewhere]);
    let mounted = moat_ok(&["image", "push", &elsewhere]);
    assert!(mounted.contains("0 uploaded, 2 mounted"), "{mounted}");
    moat_ok(&["image", "rm", &target, &by_digest, &elsewhere]);
}

#[test]
fn a_pull_cut_off_halfway_resumes_where_it_stopped() {
    let registry = Registry::start(None);
    // A layer of its own (random bytes), so that the store does not have it.
    let dir = tempfile::tempdir().unwrap();
    let mut noise = vec![0u8; 24 << 20];
    let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut urandom, &mut noise).unwrap();
    let layer = raw_tar(&[("noise", b'0', "", &noise)]);
    let tarball = dir.path().join("noise.tar");
    std::fs::write(&tarball, &layer).unwrap();
    let direct = format!("{}/resume/noise:t", registry.host());
    moat_ok(&["image", "import", tarball.to_str().unwrap(), &direct]);
    moat_ok(&["image", "push", &direct]);
    moat_ok(&["image", "rm", &direct]);

    let port = free_port();
    let through_relay = format!("localhost:{port}/resume/noise:t");
    let relay = CuttingRelay::start(port, registry.port, 0, 10 << 20);
    let cut = moat(&["image", "pull", &through_relay]);
    assert!(!cut.status.success(), "the relay cuts after 10 MiB");
    assert!(
        text(&cut.stderr).contains("to resume"),
        "{}",
        text(&cut.stderr)
    );
    assert!(
        !moat_ok(&["image", "ls", "-q"]).contains("resume/noise"),
        "no half image is named"
    );
    drop(relay);

    let _relay = CuttingRelay::start(port, registry.port, 0, 0);
    let again = moat(&["image", "pull", &through_relay]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("resuming at"),
        "{}",
        text(&again.stderr)
    );
    moat_ok(&["image", "rm", &through_relay]);
}

#[test]
fn layers_with_escaping_entries_are_refused_naming_the_entry() {
    let registry = Registry::start(None);
    ensure_template();
    let cases: [(&str, Vec<RawEntry<'_>>, &str); 4] = [
        ("absolute", vec![("/etc/evil", b'0', "", b"x")], "/etc/evil"),
        (
            "dotdot",
            vec![("a/../../evil", b'0', "", b"x")],
            "a/../../evil",
        ),
        (
            "through-link",
            vec![("out", b'2', "/etc", b""), ("out/evil", b'0', "", b"x")],
            "out/evil",
        ),
        ("device", vec![("dev-evil", b'3', "", b"")], "dev-evil"),
    ];
    for (name, entries, entry) in cases {
        let dir = tempfile::tempdir().unwrap();
        oci_layout_with_layer(dir.path(), &raw_tar(&entries));
        let image = format!("{}/evil/{name}:t", registry.host());
        skopeo_ok(&[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:t", dir.path().display()),
            &format!("docker://{image}"),
        ]);
        let ws = tempfile::tempdir_in("/tmp").unwrap();
        let out = moat(&[
            "sandbox",
            "create",
            "--name",
            &unique("evil"),
            "-t",
            &image,
            "shell",
            ws.path().to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{name}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("refusing layer entry {entry:?}")),
            "{name}: {err}"
        );
        assert!(!std::path::Path::new("/etc/evil").exists());
        let _ = moat(&["image", "rm", &image]);
    }
}
