"""One process of the two-process test in tests/test_sharding.py (run as a script).

  python tests/multihost_worker.py --process-id 0 --port 23456 --out tokens0.json [--mesh ...]

Each process gets 4 CPU devices; `jax.distributed.initialize` on 127.0.0.1 joins them into one
8-device system with gloo collectives; both processes then run the same `kvjax.generate` over a
global mesh and write the tokens they got.
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--process-id", type=int, required=True)
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--mesh", default="data=2,model=4")
parser.add_argument("--rules", default=None)
parser.add_argument("--cache", default="full")
args = parser.parse_args()

# Keep the caller's other XLA flags (the test suite compiles at a low optimization level).
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=4"])
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=2,
                           process_id=args.process_id)

import numpy as np  # noqa: E402

import kvjax  # noqa: E402
from kvjax import sharding  # noqa: E402

PROMPTS = np.random.default_rng(0).integers(0, 250, (4, 12)).astype(np.int32)
model = kvjax.load("tiny")
mesh = sharding.make_mesh(args.mesh)
rules = sharding.AxisRules.parse(args.rules) if args.rules else None
result = kvjax.generate(model, PROMPTS, max_new_tokens=8, cache=args.cache, stop_at_eos=False,
                        mesh=mesh, rules=rules)
with open(args.out, "w") as f:
  json.dump({"tokens": result.tokens.tolist(), "devices": jax.device_count(),
             "local_devices": jax.local_device_count(), "processes": jax.process_count(),
             "sharding": result.sharding}, f)
jax.distributed.shutdown()
