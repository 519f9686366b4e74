"""Load test of `serve`: N concurrent streaming clients against a localhost server, for a bounded
number of requests and seconds per phase, measured side by side for

* routed: model ``NAME`` (the gate decides each request's route in the batch's prefill), and
* base:   model ``NAME:off`` on the same engine and server (adapter layers switched off: the base
          model's compute; the gate still reads layer k in the prefill, which is all routing adds);

and, with ``--with-on``, ``NAME:on`` (adapter on for every request). Phases alternate over
``--rounds`` so a change in machine load hits both; the table shows medians over rounds and the
routing overhead as routed / base ratios. Greedy decoding; answers stop at their own length, so
throughput counts the tokens actually generated (``usage`` of each stream).

Examples::

    # a trained run
    python benchmarks/serve_load.py --checkpoint checkpoints/default --clients 8 --requests 32
    # no trained run at hand: an untrained adapter + gate on the embedded model (speed does not
    # depend on what the adapter learned)
    python benchmarks/serve_load.py --demo-checkpoint /tmp/prism-demo --clients 8 --requests 24 \\
        --max-tokens 32 --rounds 3 --threads 2 --json benchmarks/results/serve_cpu.json
    # the same on the vLLM engine (adapter as a per-request LoRA, routed by the prefix gate)
    python benchmarks/serve_load.py --demo-checkpoint /tmp/prism-demo --engine vllm ... \\
        --json benchmarks/results/serve_vllm_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_and_training import commit_hash  # noqa: E402  (one git lookup for every benchmark)

PROMPTS = [
    "What is 12 times 7?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for a job interview.",
    "Why is the sky blue?",
    "Translate 'good morning' into French and Spanish.",
    "What causes inflation?",
    "Suggest a name for a pet turtle.",
    "How do vaccines work?",
    "Write a Python function that reverses a string.",
    "What is the capital of Australia?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
]


def demo_checkpoint(path: Path) -> Path:
    """An exported checkpoint on the embedded model with an untrained (random, nonzero) adapter."""
    if (path / "prism.json").exists():
        return path
    from prism_lightning.testing import untrained_checkpoint

    return untrained_checkpoint(
        "smollm2-135m-instruct", path, lora_std=0.02, lora_params="lora_B", personas=("demo",),
        gate_hidden=[256],
    )


class Server:
    """`python -m prism_lightning serve` in a child process on a free port."""

    def __init__(self, checkpoint: Path, args: argparse.Namespace) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else dict(os.environ)
        env.pop("PRISM_API_KEY", None)  # a loopback server without a key: the clients here send none
        self.log = Path(args.log)
        cmd = [sys.executable, "-m", "prism_lightning", "serve", "--checkpoint", str(checkpoint),
               "--port", "0", "--served_model_name", "prism", "--max_batch_size", str(args.max_batch_size),
               "--log_level", "warning", "--engine", args.engine]  # fmt: skip
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_ready()

    def _wait_ready(self, timeout: float = 300) -> str:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"error: the server exited:\n{self.log.read_text()[-3000:]}")
            found = re.search(r"on (http://\S+)/v1", self.log.read_text())
            if found:
                try:
                    if httpx.get(f"{found.group(1)}/health").status_code == 200:
                        return found.group(1)
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        sys.exit("error: the server did not come up in time")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def run_phase(url: str, model: str, args: argparse.Namespace) -> dict:
    """``args.clients`` threads send streaming requests until ``args.requests`` are done or
    ``args.seconds`` have passed (requests in flight then finish and count)."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    lock = threading.Lock()
    issued = [0]
    records: list[dict] = []
    errors: list[str] = []
    start = time.perf_counter()
    stop_at = start + args.seconds

    def worker() -> None:
        while True:
            with lock:
                if issued[0] >= args.requests or time.perf_counter() >= stop_at:
                    return
                k = issued[0]
                issued[0] += 1
            sent = time.perf_counter()
            first = None
            tokens = 0
            try:
                stream = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
                    max_tokens=args.max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                )  # fmt: skip
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter()
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
            except Exception as err:  # counted, not fatal: the table says how many failed
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")
                continue
            done = time.perf_counter()
            with lock:
                records.append({"latency": done - sent, "ttft": (first or done) - sent, "tokens": tokens})

    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(r["latency"] for r in records)
    ttft = sorted(r["ttft"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    return {
        "model": model,
        "requests": len(records),
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": wall,
        "requests_per_s": len(records) / wall,
        "tokens_per_s": tokens / wall,
        "completion_tokens": tokens,
        "latency_p50_s": _pct(lat, 50),
        "latency_p99_s": _pct(lat, 99),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


METRICS = ["requests_per_s", "tokens_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s"]


def machine() -> dict:
    info = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_start": os.getloadavg(),
        "commit": commit_hash(),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint", type=Path, help="exported PRISM checkpoint to serve")
    where.add_argument("--demo-checkpoint", type=Path, help="make (once) and serve an untrained checkpoint")
    p.add_argument("--engine", default="hf", choices=("hf", "vllm"), help="the server's engine")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=32, help="requests per phase (bound)")
    p.add_argument("--seconds", type=float, default=120, help="seconds per phase (bound)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="each phase runs this many times, alternating")
    p.add_argument("--with-on", action="store_true", help="also measure NAME:on (adapter for every request)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="OMP threads of the server (default: torch's)")
    p.add_argument("--log", default="serve_load_server.log", help="the server's log file")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    for name in ("clients", "requests", "max_tokens", "rounds", "max_batch_size"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be >= 1")
    if args.seconds <= 0:
        sys.exit("error: --seconds must be > 0")
    if args.checkpoint is not None and not (args.checkpoint / "prism.json").exists():
        sys.exit(f"error: {args.checkpoint} is not an exported PRISM checkpoint (no prism.json)")
    checkpoint = args.checkpoint or demo_checkpoint(args.demo_checkpoint)

    info = machine()
    server = Server(checkpoint, args)
    phases = {"routed": "prism", "base": "prism:off"} | ({"adapter on": "prism:on"} if args.with_on else {})
    runs: dict[str, list[dict]] = {name: [] for name in phases}
    try:
        warm_up = argparse.Namespace(**{**vars(args), "requests": args.clients})
        run_phase(server.url, "prism", warm_up)
        for r in range(args.rounds):
            order = list(phases) if r % 2 == 0 else list(reversed(phases))
            for name in order:
                result = run_phase(server.url, phases[name], args)
                runs[name].append(result)
                print(f"round {r + 1} {name:<10} {result['requests']} requests, "
                      f"{result['tokens_per_s']:.1f} tok/s, p50 {result['latency_p50_s']:.2f} s",
                      flush=True)  # fmt: skip
    finally:
        server.stop()

    summary = {name: {m: statistics.median(x[m] for x in rs) for m in METRICS} for name, rs in runs.items()}
    ratios = {m: summary["routed"][m] / summary["base"][m] for m in METRICS}
    print(f"\n{args.clients} clients, {args.requests} requests or {args.seconds:g} s per phase, "
          f"max_tokens {args.max_tokens}, {args.engine} engine, median of {args.rounds} rounds "
          f"({info['cpu']}, {info['cpu_count']} cores)")  # fmt: skip
    print(f"{'':<12}" + "".join(f"{m:>16}" for m in METRICS))
    for name, row in summary.items():
        print(f"{name:<12}" + "".join(f"{row[m]:>16.3f}" for m in METRICS))
    print(f"{'routed/base':<12}" + "".join(f"{ratios[m]:>16.3f}" for m in METRICS))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        out = {"machine": info, "settings": settings, "summary": summary, "routed_over_base": ratios,
               "runs": runs}  # fmt: skip
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
