"""Online warm-up measured: a replay of the cold-start protocol through the running service and `udg warmup`,
staleness from event to updated embedding under load, and the worker's events/s per core.

    python -m loadtest.bench_warmup --out docs/results/warmup            # train, serve, replay, measure
    python -m loadtest.bench_warmup --out docs/results/warmup --summary-only   # the tables from the journal
    python -m loadtest.bench_warmup --out docs/results/warmup --summary-table  # all journals in one, no file written

1. **Replay.** The cold-start protocol's split (model/coldstart.py: active users pre-train PNN+UDG and the meta
   generator, exactly as `udg coldstart` seed S does; new users' events cut into batches a, b, c and a held-out
   rest). The model is exported and published, `udg serve` and one `udg warmup` run. Phase cold: every new
   user's rest is scored through `POST /v1/score` (with the profile: meta generator). Then per batch: its
   events go through `POST /v1/events/batch`, the bench waits until the worker has acked everything, and the
   rests are scored again; AUC and log loss from the served scores. In the same run, on the same model:
   - *offline, same rule, served histories*: the worker's rule (`--rule`, model/warm_rule.py) computed here in
     PyTorch, the rest scored with the history the service holds (the clicks sent so far): what the served
     numbers must equal;
   - *offline, same rule, data histories*: the same steps, each event and rest row with its history from the
     data (as the protocol evaluates);
   - *offline protocol, embeddings only*: `udg coldstart --warm-update embeddings` for this seed (Adam over
     minibatches of 64, the model frozen, data histories), and the protocol run with the worker's own rule
     (`--warm-rule event-<rule>`): the offline number the replay must track.
2. **Staleness.** New users' events sent at a fixed rate (open loop, `--rate` events/s, one event per request)
   while the worker runs; per event, the time from the POST's answer to the worker's write (the applied
   identity's score in Redis, written in the same Lua call as the embedding): p50, p99.
3. **Throughput.** A backlog of events of distinct new users processed by one in-process worker with one torch
   thread: events/s per core, against the same backlog read and acked without any gradient (the stream's cost).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VERSION = "replay"
PHASES = ("cold", "a", "b", "c")


def metrics_of(labels, probs) -> dict:
    from model.metrics import all_metrics

    result = all_metrics(np.asarray(labels, np.float32), np.asarray(probs, np.float32))
    return {"auc": float(result["auc"]), "log_loss": float(result["log_loss"]), "n": int(len(labels))}


# --- the protocol's users, as raw ids --------------------------------------------------------------------
class ReplayUsers:
    """New users' raw ids, profiles and events per batch (events on OOV items dropped everywhere)."""

    def __init__(self, data, split, prefix: str):
        schema = data.schema
        self.schema = schema
        tokens = schema.items.tokens
        self.users = {}
        for number in split.new_users:
            profile_idx = split.active.splits["train"].profiles[number]
            profile = {f.name: f.vocab.tokens[int(i)] for f, i in zip(schema.user_fields, profile_idx, strict=True)
                       if 2 <= int(i) < len(f.vocab.tokens)}
            self.users[int(number)] = {"id": f"{prefix}{data.user_ids[number]}", "profile": profile}
        self.batches = {}
        for name in ("a", "b", "c", "rest"):
            samples = split.batches[name]
            keep = samples.item >= 2
            self.batches[name] = {"samples": samples, "rows": np.flatnonzero(keep)}
            for field in ("item_raw",):
                self.batches[name][field] = np.array([tokens[int(i)] for i in samples.item], dtype=object)
        self.dropped = {name: int((split.batches[name].item < 2).sum()) for name in self.batches}

    def rows_of(self, name: str) -> dict[int, np.ndarray]:
        batch = self.batches[name]
        keys = batch["samples"].user_key[batch["rows"]]
        return {int(u): batch["rows"][keys == u] for u in np.unique(keys)}


# --- served -----------------------------------------------------------------------------------------------
def score_rest(base: str, users: ReplayUsers) -> tuple[list, list, dict]:
    """Every new user's rest through POST /v1/score -> (labels, scores, warm-up steps per user)."""
    import httpx

    rest = users.batches["rest"]
    labels, scores, steps = [], [], {}
    with httpx.Client(base_url=base, timeout=30) as http:
        for number, rows in users.rows_of("rest").items():
            user = users.users[number]
            items = rest["item_raw"][rows]
            candidates = list(dict.fromkeys(items))
            reply = http.post("/v1/score", json={"user_id": user["id"], "candidates": candidates,
                                                 "profile": user["profile"]})
            reply.raise_for_status()
            body = reply.json()
            by_item = dict(zip(candidates, body["scores"], strict=True))
            scores += [by_item[i] for i in items]
            labels += rest["samples"].label[rows].tolist()
            steps[number] = body["warmup_steps"]
    return labels, scores, steps


def send_batch(base: str, users: ReplayUsers, name: str, tag: str, ts0: int) -> int:
    """The batch's events, per user in time order, through POST /v1/events/batch. -> events sent."""
    import httpx

    batch = users.batches[name]
    events = []
    for number, rows in users.rows_of(name).items():
        for j, row in enumerate(rows):
            events.append({"user_id": users.users[number]["id"], "item_id": batch["item_raw"][row],
                           "clicked": bool(batch["samples"].label[row] > 0.5), "ts": ts0 + j,
                           "event_id": f"{tag}-{name}-{number}-{j}"})
    with httpx.Client(base_url=base, timeout=30) as http:
        for start in range(0, len(events), 500):
            reply = http.post("/v1/events/batch", json={"events": events[start:start + 500]})
            reply.raise_for_status()
    return len(events)


def wait_drained(client, layout, timeout_s: float = 600) -> float:
    """Until the group has no lag and nothing pending -> seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        backlog = layout.warmup_backlog(client)
        if backlog["pending"] == 0 and backlog["lag"] == 0:
            return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError("the warm-up worker did not drain the stream in time")


# --- offline, on the same model ----------------------------------------------------------------------------
def offline_rule(warm, users: ReplayUsers, rule, histories: str) -> dict:
    """The worker's rule (one step per event, in order, each user's rule state carried) computed here; the rest
    scored with the served history (`histories="served"`: the clicks sent so far) or the data's (`"data"`)."""
    import torch

    tokens = users.schema.items.tokens
    rest = users.batches["rest"]
    state = {}
    for number, user in users.users.items():
        state[number] = {"vecs": warm.generated_state(user["profile"]), "clicks": [], "rule": None}

    def raw_history(samples, row) -> list[str]:
        return [tokens[int(i)] for i in samples.histories.gather(np.array([row]))[0] if int(i) != 0]

    def evaluate() -> dict:
        labels, probs = [], []
        for number, rows in users.rows_of("rest").items():
            user_vec, udg_vec = state[number]["vecs"]
            if histories == "served":
                hist = warm.encode_history(state[number]["clicks"]).expand(len(rows), -1)
            else:
                hist = torch.as_tensor(rest["samples"].histories.gather(rows))
            with torch.no_grad():
                logits = warm.model.score(torch.as_tensor(user_vec).expand(len(rows), -1),
                                          torch.as_tensor(udg_vec).expand(len(rows), -1), hist,
                                          torch.as_tensor(rest["samples"].item[rows]))
            probs += torch.sigmoid(logits).tolist()
            labels += rest["samples"].label[rows].tolist()
        return metrics_of(labels, probs)

    phases = {"cold": evaluate()}
    for name in ("a", "b", "c"):
        batch = users.batches[name]
        samples = batch["samples"]
        plans = []
        for number, rows in users.rows_of(name).items():
            items = list(batch["item_raw"][rows])
            labels = [float(samples.label[r] > 0.5) for r in rows]
            if histories == "served":
                clicks, before = state[number]["clicks"], []
                for item, label in zip(items, labels, strict=True):
                    before.append(list(clicks))
                    if label:
                        clicks.insert(0, item)
            else:
                before = [raw_history(samples, r) for r in rows]
            plans.append((number, before, items, labels))
        udgs, rule_states = warm.apply_rule(rule, [state[p[0]]["vecs"][0] for p in plans],
                                            [state[p[0]]["vecs"][1] for p in plans],
                                            [state[p[0]]["rule"] for p in plans], [p[1] for p in plans],
                                            [p[2] for p in plans], [p[3] for p in plans])
        for (number, *_), udg_vec, rule_state in zip(plans, udgs, rule_states, strict=True):
            state[number]["vecs"] = (state[number]["vecs"][0], udg_vec)
            state[number]["rule"] = rule_state
        phases[name] = evaluate()
    return phases


def train_like_coldstart(split, kind: str, seed: int, epochs: int, meta_steps: int, threads: int):
    """Pre-training and meta-training exactly as `udg coldstart` does for one seed (model/coldstart.run_seed)."""
    from model.experiment import model_config, udg_preset
    from model.meta import MetaConfig, train_meta
    from model.train import TrainConfig, train_model

    train_config = TrainConfig(epochs=epochs, embed_weight_decay=3e-3, threads=threads)
    config = model_config(kind, udg_preset(kind))
    model, metrics = train_model(split.active, config, replace(train_config, seed=seed), progress=False)
    generator, meta_info = train_meta(model, split.active, MetaConfig(steps=meta_steps, seed=seed), progress=False)
    return model, generator, meta_info, metrics, config, train_config


OFFLINE_RULES = ("minibatch-adam", "event-sgd", "event-adam")


def offline_dir(spec: str, rule: str) -> str:
    return f"offline-{rule}" if spec == "synthetic" else f"offline-{spec}-{rule}"


def offline_rules(args) -> None:
    """The offline protocol (`udg coldstart --warm-update embeddings`, Meta arm) under each warm-up rule, over
    `--offline-seeds` seeds, each seed's pre-training shared by the rules; rows go to each rule's `udg coldstart`
    journal (`--out`/offline-<rule>/runs.jsonl, the setup that command writes), so `udg coldstart … --warm-rule
    RULE --summary-only --out …` reprints them and would have computed the same rows."""
    import torch

    from dataset.spec import load_spec
    from model.coldstart import PROTOCOLS, WarmConfig, build_split, initial_embeddings, run_arm, setup_of
    from model.commands import load_data
    from model.report import RunJournal

    torch.set_num_threads(args.threads)
    protocol = PROTOCOLS[args.spec]
    spec = load_spec(args.spec).with_overrides(**{"split.cold_user_frac": protocol.new_user_frac})
    split = build_split(load_data(spec), protocol)
    journals = {}
    for name in OFFLINE_RULES:
        warm = WarmConfig(update="embeddings", rule=name)
        setup = {"data": spec.fingerprint(), "protocol": asdict(protocol), "warm": setup_of(warm),
                 "epochs": args.epochs, "embed_wd": 3e-3, "meta_steps": args.meta_steps}
        out = Path(args.out) / offline_dir(args.spec, name)
        out.mkdir(parents=True, exist_ok=True)
        journals[name] = (warm, RunJournal(out / "runs.jsonl", setup))
    for seed in range(args.offline_seeds):
        todo = [n for n, (_, journal) in journals.items() if journal.get(args.model, "meta", seed) is None]
        if not todo:
            continue
        started = time.perf_counter()
        model, generator, meta_info, metrics, _, train_config = train_like_coldstart(
            split, args.model, seed, args.epochs, args.meta_steps, args.threads)
        pretrain = {"best_epoch": metrics["best_epoch"], "valid": metrics["valid"], "test": metrics["test"],
                    "meta_final_loss": meta_info["final_loss"], "seconds": time.perf_counter() - started}
        for name in todo:
            warm, journal = journals[name]
            result = run_arm(model, initial_embeddings("meta", model, generator, split, seed), split, train_config,
                             warm, seed)
            journal.add({"model": args.model, "variant": "meta", "seed": seed, "pretrain": pretrain, **result})
            served = result["served_history"]
            print(f"seed {seed} {name}: " + ", ".join(f"{p} {result['phases'][p]['auc']:.4f}" for p in PHASES)
                  + " | served histories, gain over no warm-up: "
                  + ", ".join(f"{p} {served['phases'][p]['auc'] - served['no_warmup'][p]['auc']:+.4f}"
                              for p in PHASES[1:]), flush=True)


# --- staleness and throughput -------------------------------------------------------------------------------
def staleness(base: str, client, layout, users: ReplayUsers, rate: float, duration_s: float, tag: str,
              senders: int = 4) -> dict:
    """Open-loop events at `rate`/s in all (one event per request, `senders` threads each at rate/senders),
    then each one's POST-answer-to-write time."""
    import threading

    import httpx

    items = [i for i in users.batches["a"]["item_raw"][users.batches["a"]["rows"]]][:200]
    profiles = [u["profile"] for u in users.users.values()]
    sent, lock = [], threading.Lock()
    interval = senders / rate
    started = time.perf_counter()

    def send(lane: int) -> None:
        with httpx.Client(base_url=base, timeout=10) as http:
            k = 0
            while time.perf_counter() - started < duration_s:
                due = started + k * interval
                now = time.perf_counter()
                if due > now:
                    time.sleep(due - now)
                n = k * senders + lane
                user, event_id = f"{tag}-u{n % 400}", f"{tag}-{n}"
                reply = http.post("/v1/events", json={"user_id": user, "item_id": items[n % len(items)],
                                                      "clicked": n % 3 == 0, "ts": n, "event_id": event_id,
                                                      "profile": profiles[n % len(profiles)]})
                reply.raise_for_status()
                with lock:
                    sent.append((user, f"id\x1f{event_id}", time.time()))
                k += 1

    threads = [threading.Thread(target=send, args=(lane,)) for lane in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    wait_drained(client, layout)
    pipe = client.pipeline(transaction=False)
    for user, identity, _ in sent:
        pipe.zscore(layout.warmup_applied(VERSION, user), identity)
    applied = pipe.execute()
    delays = np.array([a / 1000.0 - t for (_, _, t), a in zip(sent, applied, strict=True) if a is not None])
    return {"events": len(sent), "achieved_rate": len(sent) / elapsed, "applied": int(len(delays)),
            "p50_ms": float(np.percentile(delays, 50) * 1000), "p99_ms": float(np.percentile(delays, 99) * 1000),
            "max_ms": float(delays.max() * 1000)}


def throughput(client, repo: Path, users: ReplayUsers, n_events: int, tag: str) -> dict:
    """One in-process worker, one torch thread, on a backlog of distinct new users' events."""
    import torch

    from repository import ModelRepository
    from service.redis_layout import RedisLayout
    from warmup.worker import WarmupConfig, WarmupWorker

    torch.set_num_threads(1)
    layout = RedisLayout()
    items = [i for i in users.batches["a"]["item_raw"][users.batches["a"]["rows"]]][:200]
    profiles = [u["profile"] for u in users.users.values()]
    results = {}
    for mode in ("stream only", "full worker"):
        client.delete(layout.warmup_stream)
        layout.ensure_warmup_group(client)
        pipe = client.pipeline(transaction=False)
        for k in range(n_events):
            user = f"{tag}-{mode[0]}-u{k // 4}"
            pipe.xadd(layout.warmup_stream, layout.warmup_entry(user, items[k % len(items)], k % 3 == 0,
                                                                f"id\x1f{tag}-{k}", k, profiles[k % len(profiles)]))
        pipe.execute()
        worker = WarmupWorker(client, ModelRepository(repo), layout,
                              WarmupConfig(count=256, block_ms=10, claim_every_s=3600), f"bench-{mode[0]}")
        worker.refresh_versions(force=True)
        if mode == "stream only":
            worker.models = {}  # read, parse, ack: no model
        cpu, wall = time.process_time(), time.perf_counter()
        while True:
            entries = worker.fetch()
            if not entries:
                break
            worker.process(entries)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        results[mode] = {"events": n_events, "wall_s": wall, "cpu_s": cpu, "events_per_s": n_events / wall,
                         "events_per_cpu_s": n_events / cpu}
    return results


def events_cost(version_dir: Path, n: int, rounds: int = 2) -> dict:
    """POST /v1/events latency with the warm-up stream off and on (the XADDs in the clicks' MULTI/EXEC), the
    two alternating `rounds` times on a fresh Redis and service each: p50 and p99 per setting, pooled."""
    import httpx

    from loadtest.stack import publish_version, start_redis, start_service, stop
    from repository import read_manifest

    items = list(read_manifest(Path(version_dir))["features"]["items"]["tokens"])[2:50]
    latencies = {"off": [], "on": []}
    for _ in range(rounds):
        for setting in ("off", "on"):
            redis = start_redis()
            server = None
            try:
                publish_version(version_dir, redis.url)
                server, base = start_service(version_dir, redis.url, workers=1,
                                             extra_env={"UDG_WARMUP_STREAM": "true" if setting == "on" else "false"})
                with httpx.Client(base_url=base, timeout=10) as http:
                    for k in range(n + 100):
                        started = time.perf_counter()
                        event = {"user_id": f"c{k % 500}", "item_id": items[k % len(items)], "clicked": k % 2 == 0,
                                 "ts": k}
                        reply = http.post("/v1/events", json=event)
                        elapsed = time.perf_counter() - started
                        reply.raise_for_status()
                        if k >= 100:  # the first requests warm the connection and the scripts up
                            latencies[setting].append(elapsed)
            finally:
                stop(server)
                redis.cleanup()
    return {setting: {"requests": len(v), "p50_ms": float(np.percentile(v, 50) * 1000),
                      "p99_ms": float(np.percentile(v, 99) * 1000)} for setting, v in latencies.items()}


# --- the run -------------------------------------------------------------------------------------------------
def run(args) -> dict:
    import torch

    from dataset.spec import load_spec
    from export.onnx_export import export_model
    from loadtest.stack import start_redis, start_service, stop
    from model.checkpoint import Checkpoint, MetaState
    from model.coldstart import PROTOCOLS, WarmConfig, build_split, initial_embeddings, run_arm
    from model.commands import load_data
    from repository import ModelRepository
    from service.publish import publish, sync_redis
    from service.redis_layout import RedisLayout
    from warmup.model import WarmupModel

    torch.set_num_threads(args.threads)
    protocol = PROTOCOLS[args.spec]
    spec = load_spec(args.spec).with_overrides(**{"split.cold_user_frac": protocol.new_user_frac})
    data = load_data(spec)
    split = build_split(data, protocol)
    print(f"protocol split: {split.info}", flush=True)
    started = time.perf_counter()
    model, generator, meta_info, metrics, config, train_config = train_like_coldstart(
        split, args.model, args.seed, args.epochs, args.meta_steps, args.threads)
    print(f"pre-training + meta: {time.perf_counter() - started:.0f} s", flush=True)
    workdir = Path(args.workdir)
    repo = workdir / "model_repo"
    checkpoint = Checkpoint.from_training(model, config, train_config, split.active, metrics,
                                          meta=MetaState(generator.state_dict(), meta_info))
    export_model(checkpoint, VERSION, repo, overwrite=True, model=model)
    warm = WarmupModel.load(ModelRepository(repo), VERSION)
    rule = warm.rule(args.rule, args.alpha)
    alpha = rule.lr

    journal = {"command": " ".join(["python -m loadtest.bench_warmup", *sys.argv[1:]]), "spec": args.spec,
               "model": args.model, "seed": args.seed, "epochs": args.epochs, "meta_steps": args.meta_steps,
               "alpha": alpha, "rule": rule.name, "split": split.info,
               "machine": f"{os.cpu_count()} cores, shared (loaded)",
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "load_average": list(os.getloadavg())}
    offline = {"protocol_embeddings_adam": run_arm(model, initial_embeddings("meta", model, generator, split,
                                                                               args.seed), split, train_config,
                                                   WarmConfig(update="embeddings"), args.seed)["phases"],
               "protocol_event_rule": run_arm(model, initial_embeddings("meta", model, generator, split, args.seed),
                                              split, train_config, WarmConfig(update="embeddings",
                                                                              rule=f"event-{rule.name}", lr=rule.lr),
                                              args.seed)["phases"]}
    users = ReplayUsers(data, split, prefix="replay-")
    journal["dropped_oov_events"] = users.dropped
    offline["rule_served_histories"] = offline_rule(warm, users, rule, "served")
    offline["rule_data_histories"] = offline_rule(warm, users, rule, "data")
    offline["no_warmup_served_histories"] = offline_rule(warm, users, warm.rule("sgd", 0.0), "served")
    journal["offline"] = offline

    redis = start_redis()
    server = worker = None
    layout = RedisLayout()
    try:
        client = sync_redis(redis.url, timeout_s=10)
        publish(repo / VERSION, client, progress=False)
        server, base = start_service(repo / VERSION, redis.url, workers=1,
                                     log_path=workdir / "serve.log")
        import subprocess

        env = {**os.environ, "REDIS_URL": redis.url, "UDG_MODEL_REPO": str(repo), "PYTHONPATH": str(ROOT)}
        worker_log = open(workdir / "warmup.log", "ab")  # noqa: SIM115 - closed below
        worker = subprocess.Popen([sys.executable, "-m", "udg_cli", "warmup", "--rule", rule.name, "--alpha",
                                   str(alpha), "--block-ms", "100", "--consumer", "bench"], env=env, cwd=ROOT,
                                  stdout=worker_log, stderr=subprocess.STDOUT)
        served, drain, steps_seen = {}, {}, {}
        labels, scores, steps = score_rest(base, users)
        served["cold"] = metrics_of(labels, scores)
        steps_seen["cold"] = int(sum(steps.values()))
        ts0 = 0
        for name in ("a", "b", "c"):
            sent = send_batch(base, users, name, "replay", ts0)
            ts0 += 1000
            drain[name] = {"events": sent, "drain_s": wait_drained(client, layout)}
            labels, scores, steps = score_rest(base, users)
            served[name] = metrics_of(labels, scores)
            steps_seen[name] = int(sum(steps.values()))
            print(f"replay {name}: {served[name]} (drained {drain[name]['drain_s']:.1f} s)", flush=True)
        journal["served"] = served
        journal["drain"] = drain
        journal["served_warmup_steps"] = steps_seen
        journal["staleness"] = staleness(base, client, layout, users, args.rate, args.duration, "stale")
        print(f"staleness: {journal['staleness']}", flush=True)
        stop(worker)
        worker = None
        journal["throughput"] = throughput(client, repo, users, args.throughput_events, "tp")
        print(f"throughput: {journal['throughput']}", flush=True)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(10)
        stop(server)
        redis.cleanup()
    return journal


def rule_label(journal: dict) -> str:
    """The worker's rule of a journal (journals before `--rule` existed: sgd)."""
    name = journal.get("rule", "sgd")
    return f"{name}, {'α' if name == 'sgd' else 'lr'} = {journal['alpha']:g}"


def report(journal: dict) -> str:
    served, offline = journal["served"], journal["offline"]
    rows = [("served: service + `udg warmup` (HTTP, Redis, ONNX)", served),
            ("offline, same rule, served histories", offline["rule_served_histories"]),
            ("offline, same rule, data histories", offline["rule_data_histories"]),
            ("offline protocol `--warm-update embeddings` (Adam)", offline["protocol_embeddings_adam"])]
    if "protocol_event_rule" in offline:
        rows.append((f"offline protocol `--warm-rule event-{journal.get('rule', 'sgd')}`",
                     offline["protocol_event_rule"]))
    if "no_warmup_served_histories" in offline:  # the history alone: what the events give without warm-up
        rows.insert(1, ("offline, no warm-up (α = 0), served histories", offline["no_warmup_served_histories"]))
    lines = [f"### Replay: {journal['spec']}, {journal['model'].upper()}+UDG, seed {journal['seed']} "
             f"(pre-training {journal['epochs']} epochs at most, meta {journal['meta_steps']} steps), "
             f"rule {rule_label(journal)}, one step per event", "",
             f"New users {journal['split']['new_users']}; events per batch {journal['split']['a_events']}; "
             f"held-out rest {journal['split']['rest_events']} events.", "",
             "| AUC on the new users' held-out rest | " + " | ".join(PHASES) + " |",
             "|---|" + "---|" * len(PHASES)]
    for label, phases in rows:
        lines.append(f"| {label} | " + " | ".join(f"{phases[p]['auc']:.4f}" for p in PHASES) + " |")
    lines += ["", "| log loss | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
    for label, phases in rows:
        lines.append(f"| {label} | " + " | ".join(f"{phases[p]['log_loss']:.4f}" for p in PHASES) + " |")
    gap = max(abs(served[p]["auc"] - offline["rule_served_histories"][p]["auc"]) for p in PHASES)
    lines += ["", f"Served vs the same rule computed offline with the same histories: max |ΔAUC| = {gap:.5f}."]
    gains = [("rule, data histories", offline["rule_data_histories"]),
             ("protocol (Adam)", offline["protocol_embeddings_adam"])]
    base = offline.get("no_warmup_served_histories")
    cells = [f"{label}: " + ", ".join(f"{p} {phases[p]['auc'] - phases['cold']['auc']:+.4f}" for p in PHASES[1:])
             for label, phases in gains]
    if base:
        cells.insert(0, "served: " + ", ".join(f"{p} {served[p]['auc'] - base[p]['auc']:+.4f}" for p in PHASES[1:])
                     + " (against α = 0 with the same histories)")
    lines += ["What the embedding updates add to the AUC: " + "; ".join(cells) + ".",
              "Warm-up steps reported by `/v1/score` (sum over new users) after each phase: "
              + ", ".join(f"{p} {journal['served_warmup_steps'][p]}" for p in PHASES) + "; worker drain time per "
              "batch: " + ", ".join(f"{p} {d['drain_s']:.1f} s ({d['events']} events)"
                                   for p, d in journal["drain"].items()) + ".", ""]
    s = journal["staleness"]
    lines += ["### Staleness: event answered -> embedding written", "",
              "| offered events/s | achieved | events | applied | p50 ms | p99 ms | max ms |",
              "|---|---|---|---|---|---|---|",
              f"| {journal.get('rate', '')} | {s['achieved_rate']:.0f} | {s['events']} | {s['applied']} | "
              f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['max_ms']:.1f} |", ""]
    t = journal["throughput"]
    lines += ["### Worker throughput (one process, one torch thread)", "",
              "| mode | events | wall s | CPU s | events/s | events per CPU-second |", "|---|---|---|---|---|---|"]
    for mode, r in t.items():
        lines.append(f"| {mode} | {r['events']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['events_per_s']:.0f} | "
                     f"{r['events_per_cpu_s']:.0f} |")
    lines += ["", f"Machine: {journal['machine']}. Command: `{journal['command']}`."]
    return "\n".join(lines)


def _offline_rows(journal: Path) -> tuple[float | None, list[dict]]:
    """The Meta arm's rows of a `udg coldstart` journal under its latest setup (as its report counts them), and
    the step of its event rule (None for minibatch Adam)."""
    if not journal.exists():
        return None, []
    entries = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    setup = entries[-1]["setup"]
    rows = {(e["row"]["model"], e["row"]["seed"]): e["row"] for e in entries
            if e["setup"] == setup and e["row"]["variant"] == "meta"}
    step = None
    if setup["warm"].get("rule", "minibatch-adam") != "minibatch-adam":
        from model.coldstart import WarmConfig, event_rule
        from model.train import TrainConfig

        step = event_rule(WarmConfig(**setup["warm"]), TrainConfig()).lr
    return step, [rows[k] for k in sorted(rows)]


def _gain(row: dict, histories: str) -> dict[str, float]:
    """AUC added per batch: data histories (the protocol's evaluation) against its cold phase; served histories
    against the initial embeddings scored with the same histories (what the replay's served rows measure)."""
    if histories == "data":
        return {p: row["phases"][p]["auc"] - row["phases"]["cold"]["auc"] for p in PHASES[1:]}
    served = row["served_history"]
    return {p: served["phases"][p]["auc"] - served["no_warmup"][p]["auc"] for p in PHASES[1:]}


def _mean_std(gains: list[dict[str, float]]) -> str:
    cells = []
    for p in PHASES[1:]:
        values = [g[p] for g in gains]
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        cells.append(f"{float(np.mean(values)):+.4f} ± {sd:.4f}")
    return " | ".join(cells)


def _cells(gain: dict[str, float]) -> str:
    return " | ".join(f"{gain[p]:+.4f}" for p in PHASES[1:])


RULE_LABELS = {"minibatch-adam": "minibatch Adam (the paper's passes)",
               "event-sgd": "event-sgd (`udg warmup --rule sgd`)",
               "event-adam": "event-adam (`udg warmup --rule adam`)"}


def summary_table(out: Path) -> str:
    """One view of every committed journal in `out`. Table 1: what the embedding updates add to the new users'
    AUC after each batch — each replay's served scores against the same events with no embedding update, the
    offline protocol under the same rule and the same (served) histories for the same seed and over seeds, and
    the protocol's own data-history evaluation; table 2: each replay's AUCs, staleness and worker throughput;
    table 3: what the stream costs POST /v1/events."""
    journals = [json.loads(path.read_text()) for path in sorted(out.glob("replay-*.json"))]
    if not journals:
        raise SystemExit(f"no replay-*.json journal in {out}")
    offline = {(spec, rule): _offline_rows(out / offline_dir(spec, rule) / "runs.jsonl")
               for spec in sorted({j["spec"] for j in journals}) for rule in OFFLINE_RULES}
    lines = ["| AUC added after batch | " + " | ".join(PHASES[1:]) + " |", "|---|" + "---|" * len(PHASES[1:])]
    for j in journals:
        base = j["offline"].get("no_warmup_served_histories")
        if base is None:
            continue
        rule = f"event-{j.get('rule', 'sgd')}"
        lines.append(f"| **served** (service + worker), {j['spec']}, {rule_label(j)}, seed {j['seed']}: against no "
                     "warm-up, same histories | "
                     + _cells({p: j["served"][p]["auc"] - base[p]["auc"] for p in PHASES[1:]}) + " |")
        step, rows = offline[(j["spec"], rule)]
        paired = [r for r in rows if r["seed"] == j["seed"] and "served_history" in r]
        same_model = paired and abs(paired[0]["phases"]["cold"]["auc"]
                                    - j["offline"]["protocol_embeddings_adam"]["cold"]["auc"]) < 1e-4
        if same_model and step is not None and abs(step - j["alpha"]) < 1e-12:
            lines.append(f"| offline protocol `--warm-rule {rule}`, {j['spec']}, seed {j['seed']}, served histories "
                         "(the same pre-training) | " + _cells(_gain(paired[0], "served")) + " |")
    for (spec, rule), (_, rows) in offline.items():
        rows = [r for r in rows if "served_history" in r]
        if rows:
            lines.append(f"| offline protocol, {RULE_LABELS[rule]}, {spec}, {len(rows)} seeds, served histories, "
                         "mean ± std | " + _mean_std([_gain(r, "served") for r in rows]) + " |")
    for (spec, rule), (_, rows) in offline.items():
        if rows:
            lines.append(f"| offline protocol, {RULE_LABELS[rule]}, {spec}, {len(rows)} seeds, data histories "
                         "(against its cold phase), mean ± std | " + _mean_std([_gain(r, "data") for r in rows])
                         + " |")
    for j in journals:  # a data set with no multi-seed offline journal: the replay's own offline rows
        if j["spec"] != "synthetic" and not any(offline[(j["spec"], r)][1] for r in OFFLINE_RULES):
            rule = j["offline"]["rule_data_histories"]
            lines.append(f"| offline rule, {j['spec']}, {rule_label(j)}, seed {j['seed']}, data histories (against "
                         "its cold phase) | " + _cells(_gain({"phases": rule}, "data")) + " |")
            p = j["offline"]["protocol_embeddings_adam"]
            lines.append(f"| offline protocol, minibatch Adam, {j['spec']}, seed {j['seed']}, data histories "
                         "(against its cold phase) | " + _cells(_gain({"phases": p}, "data")) + " |")
    lines += ["", "| replay | served AUC cold / a / b / c | max \\|ΔAUC\\| served vs offline rule | staleness "
              "p50 / p99 / max ms (events/s achieved) | worker events per CPU-second (stream only) | machine |",
              "|---|---|---|---|---|---|"]
    for j in journals:
        gap = max(abs(j["served"][p]["auc"] - j["offline"]["rule_served_histories"][p]["auc"]) for p in PHASES)
        s, t = j["staleness"], j["throughput"]
        lines.append(f"| {j['spec']}, {rule_label(j)} | "
                     + " / ".join(f"{j['served'][p]['auc']:.4f}" for p in PHASES)
                     + f" | {gap:.4f} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} / {s['max_ms']:.1f} "
                       f"({s['achieved_rate']:.0f}) | {t['full worker']['events_per_cpu_s']:,.0f} "
                       f"({t['stream only']['events_per_cpu_s']:,.0f}) | {j['machine']} |")
    cost_path = out / "events-cost.json"
    if cost_path.exists():  # what the warm-up stream costs POST /v1/events
        cost = json.loads(cost_path.read_text())
        lines += ["", "| POST /v1/events, warm-up stream | requests | p50 ms | p99 ms |", "|---|---|---|---|",
                  *(f"| {k} | {cost[k]['requests']} | {cost[k]['p50_ms']:.3f} | {cost[k]['p99_ms']:.3f} |"
                    for k in ("off", "on"))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="synthetic", choices=["synthetic", "movielens-100k"])
    parser.add_argument("--model", default="pnn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--meta-steps", type=int, default=500)
    parser.add_argument("--alpha", type=float, default=None, help="default: the version's meta-training α")
    parser.add_argument("--rate", type=float, default=100.0, help="offered events/s of the staleness run")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--throughput-events", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="results/bench_warmup")
    parser.add_argument("--out", default="docs/results/warmup")
    parser.add_argument("--name", default=None, help="journal name (default: SPEC-alphaA, SPEC-RULE-lrA)")
    parser.add_argument("--rule", choices=["sgd", "adam"], default="sgd",
                        help="the worker's rule (`udg warmup --rule`)")
    parser.add_argument("--offline-seeds", type=int, default=0, metavar="N",
                        help="only run the offline protocol under every warm-up rule for seeds 0..N-1 (journals "
                             "in --out/offline-<rule>/), no service")
    parser.add_argument("--summary-only", action="store_true", help="the report from the journal, running nothing")
    parser.add_argument("--summary-table", action="store_true",
                        help="print the journals' summary tables (README.md includes them); runs and writes nothing")
    parser.add_argument("--events-cost", type=int, default=0, metavar="N",
                        help="only measure POST /v1/events with the stream off and on (N requests each, on the "
                             "version --workdir's replay run exported) into events-cost.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.summary_table:
        print(summary_table(out))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if args.offline_seeds:
        offline_rules(args)
        return 0
    if args.events_cost:
        cost = events_cost(Path(args.workdir) / "model_repo" / VERSION, args.events_cost)
        cost["command"] = " ".join(["python -m loadtest.bench_warmup", *sys.argv[1:]] if argv is None else
                                   ["python -m loadtest.bench_warmup", *argv])
        (out / "events-cost.json").write_text(json.dumps(cost, indent=1) + "\n")
    elif not args.summary_only:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        journal = run(args)
        journal["rate"] = args.rate
        name = args.name or (f"{args.spec}-alpha{journal['alpha']:g}" if journal["rule"] == "sgd"
                             else f"{args.spec}-{journal['rule']}-lr{journal['alpha']:g}")
        (out / f"replay-{name}.json").write_text(json.dumps(journal, indent=1) + "\n")
    texts = [report(json.loads(path.read_text())) for path in sorted(out.glob("replay-*.json"))]
    if not texts:
        raise SystemExit(f"no replay-*.json journal in {out}")
    cost_path = out / "events-cost.json"
    if cost_path.exists():
        cost = json.loads(cost_path.read_text())
        texts.append("\n".join(["### POST /v1/events with the warm-up stream off and on", "",
                                "| stream | requests | p50 ms | p99 ms |", "|---|---|---|---|",
                                *(f"| {k} | {cost[k]['requests']} | {cost[k]['p50_ms']:.3f} | {cost[k]['p99_ms']:.3f} |"
                                  for k in ("off", "on")), "",
                                "One event per request, sequential, fresh Redis and service per round, the two "
                                f"settings alternating. Command: `{cost['command']}`."]))
    text = "\n\n".join(texts)
    (out / "report.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
