#!/usr/bin/env bash
# Install what moat needs on a Debian/Ubuntu host (as root, or through sudo):
#   mmdebstrap  builds the `shell` template from Debian's packages
#   uidmap      newuidmap/newgidmap, for rootless sandboxes
#   runsc       gVisor, for the gvisor isolation tier
#   libc6-dev   the static C library, for the gvisor tier's guest helper
# and, for the tests and benchmarks: bubblewrap (the speed peer), tmux (terminal tests),
# docker-registry (a real OCI registry), skopeo (a second OCI implementation and the
# registry peer), apache2-utils (htpasswd, for a registry behind basic auth), the
# docker client (the seed's `docker sandbox`/`docker model` lines, through moat's plugins);
# and, to build llama.cpp (the model runner's engine, through llama-cpp-sys-2):
# cmake, clang and libclang-dev (bindgen).
# Installs only what is missing, so a second run costs nothing.
set -euo pipefail
need=()
for pair in mmdebstrap:mmdebstrap newuidmap:uidmap runsc:runsc bwrap:bubblewrap tmux:tmux curl:curl openssl:openssl \
    docker-registry:docker-registry skopeo:skopeo htpasswd:apache2-utils \
    cmake:cmake clang:clang c++:g++ python3:python3 docker:docker.io; do
  cmd=${pair%%:*} pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
# bindgen needs libclang itself, which no command stands for.
dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q 'ok installed' || need+=(libclang-dev)
# The gvisor tier's guest helper links the C library statically.
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -e /usr/lib/aarch64-linux-gnu/libc.a ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "moat: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "moat: cargo is missing; install Rust from https://rustup.rs" >&2
  exit 1
fi
