#!/usr/bin/env bash
# Trainer image entrypoint (Dockerfile target `trainer`): train -> export -> publish, once.
#
#   udg train  $UDG_TRAIN_ARGS "$@" --out $UDG_WORK_DIR/checkpoint.pt
#   udg export $UDG_WORK_DIR/checkpoint.pt --version $UDG_MODEL_VERSION --out $UDG_MODEL_REPO
#   udg publish $UDG_MODEL_REPO/$UDG_MODEL_VERSION        (per-user state into REDIS_URL)
#
# Idempotent: when MODEL_REPO/VERSION already holds a manifest (a restarted stack, a persistent volume), training
# and export are skipped and only the publish runs again (publish is idempotent itself), unless UDG_RETRAIN=1,
# which retrains and replaces the version. Arguments are appended to `udg train`'s.
#
# Environment: UDG_MODEL_REPO (/models), UDG_MODEL_VERSION (v1), UDG_WORK_DIR (checkpoint directory),
# UDG_TRAIN_ARGS (default "--udg --cold-users 0.1": PNN+UDG with its meta generator on MovieLens-100K;
# e.g. "--udg --data synthetic --synthetic-users 20000" needs no download), UDG_RETRAIN (0), UDG_PUBLISH (1),
# REDIS_URL (read by `udg publish`).
set -euo pipefail

repo="${UDG_MODEL_REPO:-/models}"
version="${UDG_MODEL_VERSION:-v1}"
work="${UDG_WORK_DIR:-${HOME:-/tmp}/runs}"
read -r -a train_args <<< "${UDG_TRAIN_ARGS:---udg --cold-users 0.1}"
target="${repo%/}/${version}"
checkpoint="${work%/}/checkpoint.pt"

log() { printf 'udg-trainer: %s\n' "$*" >&2; }

mkdir -p "$repo" "$work"
# A version is exported once its manifest exists (the writer publishes the directory whole, with one rename);
# the file name is repository.layout.MANIFEST_FILE, kept literal here so this check needs no Python start-up.
if [[ -f "$target/manifest.json" && "${UDG_RETRAIN:-0}" != "1" ]]; then
  log "$target already exported; skipping training and export (UDG_RETRAIN=1 retrains)"
else
  export_flags=()
  [[ -e "$target" ]] && export_flags+=(--force)
  log "training: udg train ${train_args[*]} $* --out $checkpoint"
  udg train "${train_args[@]}" "$@" --out "$checkpoint"
  log "exporting $checkpoint to $target"
  udg export "$checkpoint" --version "$version" --out "$repo" "${export_flags[@]}"
fi

if [[ "${UDG_PUBLISH:-1}" == "1" ]]; then
  log "publishing $target"
  udg publish "$target"
else
  log "UDG_PUBLISH=${UDG_PUBLISH}; not publishing"
fi
log "done: $target"
