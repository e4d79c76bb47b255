#!/bin/sh
# openclaw, as the sandbox runs it. moat's seccomp filter answers openat2
# with ENOSYS (its flags and mode sit in memory, where the filter cannot see
# a set-id mode); the native binding of OpenClaw's fs-safe has no fallback
# for that, its portable implementation does the same checks without it.
export FS_SAFE_NATIVE_MODE="${FS_SAFE_NATIVE_MODE:-off}"
exec node /usr/local/lib/node_modules/openclaw/openclaw.mjs "$@"
