"""Run by test_node_loss.py in its own process: a 3-node Ray cluster on this machine
(ray.cluster_utils.Cluster: a head without CPUs for the driver, two worker nodes
each holding one caption actor), a captioning job, and a worker node killed
mid-job. A replacement node joins, as a cluster autoscaler would bring one.
Prints one JSON line: the report and the nodes."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
# Keep every raylet and the driver on loopback: without this, ray.init rewrites 127.0.0.1 to the
# machine's address, where a head started on 127.0.0.1 does not listen (Ray reads this switch, meant
# for single-machine clusters, when it picks a node's address).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def main(videos: str, output: str, model: str, drafter: str, faults_file: str) -> None:
    os.environ["FLASHCAP_FAULTS_FILE"] = faults_file  # workers inherit it: slow batches, so the kill lands mid-job
    import pyarrow.parquet as pq
    from ray.cluster_utils import Cluster

    from demo.world import PROMPT
    from pipeline.config import load_config
    from pipeline.run import run_job

    node = dict(node_ip_address="127.0.0.1", object_store_memory=100 * 2**20)
    cluster = Cluster(
        initialize_head=True, connect=True, head_node_args=dict(num_cpus=0, include_dashboard=False, **node)
    )
    workers = [cluster.add_node(num_cpus=1, **node) for _ in range(2)]
    config = load_config(
        input=videos,
        output=output,
        model=model,
        drafter=drafter,
        prompt=PROMPT,
        max_new_tokens=8,
        dtype="float64",
        batch_size=2,
        flush_rows=2,
        min_actors=2,
        max_actors=2,
        cpus_per_actor=0.75,  # one caption actor per worker node
        cpus_per_decode=0.25,
    )
    killed: dict = {}

    def kill_a_captioning_node(running) -> None:
        while running():
            parts = sorted(Path(output).glob("*.parquet"))
            if parts:
                seen = {n.split("@")[0] for n in pq.read_table(parts[0]).column("worker_node").to_pylist()}
                victim = next((w for w in workers if w.node_id[:12] in seen), None)
                if victim is not None:
                    rows_before = sum(pq.read_table(p).num_rows for p in parts)
                    cluster.remove_node(victim, allow_graceful=False)
                    killed.update(node=victim.node_id[:12], rows_before=rows_before, at=time.time())
                    cluster.add_node(num_cpus=1, **node)  # the autoscaler's replacement
                    return
            time.sleep(0.05)

    # The job runs in a thread; nodes are added and removed from the main thread (Ray needs it for signals).
    result: dict = {}

    def job() -> None:
        try:
            result["report"] = run_job(config, log=lambda line: print(line, file=sys.stderr, flush=True))
        except BaseException as err:  # reported below
            result["error"] = repr(err)

    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    kill_a_captioning_node(runner.is_alive)
    runner.join(timeout=900)
    print(json.dumps({**result, "killed": killed}, default=str), flush=True)
    import ray

    ray.shutdown()
    cluster.shutdown()
    sys.stderr.flush()
    os._exit(0)  # the verdict is the JSON line; interpreter teardown of a killed cluster may exit non-zero


if __name__ == "__main__":
    main(*sys.argv[1:6])
