#!/usr/bin/env bash
# Trainer image entrypoint (Dockerfile target `trainer`): make one model version, once:
#
#   udg make-version --repo $UDG_MODEL_REPO --version $UDG_MODEL_VERSION --workdir $UDG_WORK_DIR \
#                    [--retrain] [--no-publish] -- $UDG_TRAIN_ARGS "$@"
#
# i.e. train -> export -> publish (pipeline.make_version, the same steps `udg quickstart` and `udg loadtest` take).
# Idempotent: a version already in MODEL_REPO (a restarted stack, a persistent volume) is not trained or
# exported again, only published again (publish is idempotent itself), unless UDG_RETRAIN=1, which retrains and
# replaces the version. Arguments are appended to `udg train`'s.
#
# Environment: UDG_MODEL_REPO (/models), UDG_MODEL_VERSION (v1), UDG_WORK_DIR (checkpoint directory),
# UDG_TRAIN_ARGS (default "--udg --cold-users 0.1": PNN+UDG with its meta generator on MovieLens-100K;
# e.g. "--udg --spec synthetic --synthetic-users 20000" needs no download, "--udg --spec /data/my-log.toml"
# trains on your own log), UDG_RETRAIN (0), UDG_PUBLISH (1), REDIS_URL (where the version is published).
set -euo pipefail

repo="${UDG_MODEL_REPO:-/models}"
version="${UDG_MODEL_VERSION:-v1}"
work="${UDG_WORK_DIR:-${HOME:-/tmp}/runs}"
read -r -a train_args <<< "${UDG_TRAIN_ARGS:---udg --cold-users 0.1}"

flags=()
[[ "${UDG_RETRAIN:-0}" == "1" ]] && flags+=(--retrain)
[[ "${UDG_PUBLISH:-1}" == "1" ]] || flags+=(--no-publish)
mkdir -p "$repo" "$work"
exec udg make-version --repo "$repo" --version "$version" --workdir "$work" "${flags[@]}" -- "${train_args[@]}" "$@"
