"""Load test of `serve`: N concurrent streaming clients against localhost servers, for a bounded
number of requests and seconds per phase, measured side by side for

* engines: ``--engines hf,vllm`` starts one server per engine, all up at once (only the one being
  measured works), so the engines are measured in one run on one machine state;
* schedulers (hf engine): ``continuous`` (a request joins the running batch at the next decode step)
  and ``static`` (each batch runs to its end before the next starts), one server each;
* client counts, e.g. ``--clients 8,32``;
* models: routed ``NAME`` (the gate decides each request's route) and base ``NAME:off`` (adapter layers
  switched off: the base model's compute; the routing work is all the routed phase adds); with
  ``--with-on`` also ``NAME:on``.

A phase is one server x client count x model. Every phase runs once per round; phases are interleaved
(the order reverses every other round) so a change in machine load hits all of them, and the 1-minute
load average is recorded after each phase. The table pools each phase's requests over the rounds: TTFT
and latency percentiles over all its requests, throughput as its tokens over its wall time. Ratios
(continuous / static, routed / base per server, vllm / hf per model) keep rates (requests/s, tokens/s)
and times (latency, TTFT) in separate, labelled columns. The routed phases record the share of
requests the gate routed to the adapter. Greedy decoding; answers stop at their own length, so
throughput counts the tokens actually generated (``usage`` of each stream). Within an engine, each
phase checks its answers against that engine's first phase's answers to the same prompts (greedy
answers do not depend on the scheduler or the batch); between engines (hf and vLLM may differ in
floating point) the share of identical answers is reported, not enforced.

Examples::

    # a trained run
    python benchmarks/serve_load.py --checkpoint checkpoints/default --clients 8 --requests 32
    # no trained run at hand: an untrained adapter + gate on the embedded model (speed does not
    # depend on what the adapter learned); continuous vs static batching at 8 and 32 streams
    python benchmarks/serve_load.py --demo-checkpoint /tmp/prism-demo --schedulers continuous,static \
        --clients 8,32 --models routed --requests 100 --rounds 2 --max-tokens 16 --threads 2 \
        --json benchmarks/results/serve_continuous_cpu.json
    # both engines in one run (vLLM: adapter as a per-request LoRA, routed by the prefix gate before
    # admission; it schedules itself), routed and base, 200 requests or 240 s per phase and round
    python benchmarks/serve_load.py --demo-checkpoint /tmp/prism-demo --engines hf,vllm --clients 8 \
        --models routed,base --requests 200 --seconds 240 --rounds 2 --max-tokens 16 --threads 2 \
        --threshold 0.4672 --json benchmarks/results/serve_engines_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
import typing
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
        "smollm2-135m-instruct",
        path,
        lora_std=0.02,
        lora_params="lora_B",
        personas=("demo",),
        gate_hidden=[256],
    )


class Server:
    """`python -m prism_lightning serve` in a child process on a free port."""

    def __init__(
        self, checkpoint: Path, args: argparse.Namespace, engine: str, scheduler: str | None
    ) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else dict(os.environ)
        env.pop("PRISM_API_KEY", None)  # a loopback server without a key: the clients here send none
        self.log = Path(f"{args.log}.{server_label(engine, scheduler)}")
        cmd = [sys.executable, "-m", "prism_lightning", "serve", "--checkpoint", str(checkpoint),
               "--port", "0", "--served_model_name", "prism", "--max_batch_size", str(args.max_batch_size),
               "--log_level", "warning", "--engine", engine]  # fmt: skip
        if scheduler is not None:
            cmd += ["--scheduler", scheduler]
        if args.threshold is not None:
            cmd += ["--threshold", str(args.threshold)]
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
        self.proc.kill()
        self.proc.wait()
        sys.exit(f"error: the server did not come up in time (log: {self.log})")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def run_phase(url: str, model: str, clients: int, args: argparse.Namespace) -> dict:
    """``clients`` threads send streaming requests until ``args.requests`` are done or ``args.seconds``
    have passed (requests in flight then finish and count)."""
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
            route = None
            parts = []
            try:
                stream = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
                    max_tokens=args.max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                )  # fmt: skip
                for chunk in stream:
                    prism = (chunk.model_extra or {}).get("prism")
                    if prism is not None and route is None:
                        route = prism.get("route")
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter()
                        parts.append(chunk.choices[0].delta.content)
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
            except Exception as err:  # counted, not fatal: the table says how many failed
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")
                continue
            done = time.perf_counter()
            with lock:
                records.append({"latency": done - sent, "ttft": (first or done) - sent, "tokens": tokens,
                                "route": route, "prompt": k % len(PROMPTS),
                                "text": "".join(parts)})  # fmt: skip

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - start, "records": records, "errors": errors}


def pooled(runs: list[dict]) -> dict:
    """One phase's numbers over all its rounds."""
    records = [r for run in runs for r in run["records"]]
    errors = [e for run in runs for e in run["errors"]]
    wall = sum(run["wall_s"] for run in runs)
    lat = sorted(r["latency"] for r in records)
    ttft = sorted(r["ttft"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    routes = [r["route"] for r in records if r["route"] is not None]
    return {
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
        "routed_share": sum(r == "adapter" for r in routes) / len(routes) if routes else None,
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


RATES = ["requests_per_s", "tokens_per_s"]  # higher is faster
TIMES = ["latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s"]  # lower is faster
METRICS = RATES + TIMES
ENGINES = ("hf", "vllm")
SCHEDULERS = ("continuous", "static")
MODELS = {"routed": "prism", "base": "prism:off"}


def server_label(engine: str, scheduler: str | None) -> str:
    return engine if scheduler is None else f"{engine}-{scheduler}"


def ratio(top: dict, bottom: dict) -> dict:
    """top / bottom of two phases' pooled numbers, rates and times apart (a rate ratio above 1 and a
    time ratio below 1 both mean ``top`` is faster)."""

    def div(m: str) -> float | None:
        a, b = top[m], bottom[m]
        return a / b if b and a == a and b == b else None  # no requests or nan: no ratio

    return {"rate": {m: div(m) for m in RATES}, "time": {m: div(m) for m in TIMES}}


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


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one ``error:`` line and exit status 2 (no usage block)."""

    def error(self, message: str) -> typing.NoReturn:
        _fail(message)


def _fail(message: str) -> typing.NoReturn:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def _names(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        _fail(f"{flag} takes a comma-separated list of {', '.join(allowed)}; got {text!r}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (bad input: one error line, exit 2), with the plan added: ``servers``
    (engine, scheduler or None) pairs, ``client_counts`` and ``model_names`` (phase -> served name)."""
    p = _OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint", type=Path, help="exported PRISM checkpoint to serve")
    where.add_argument("--demo-checkpoint", type=Path, help="make (once) and serve an untrained checkpoint")
    p.add_argument("--engines", "--engine", default="hf", help="hf, vllm or hf,vllm (one server each)")
    p.add_argument("--schedulers", default="continuous", help="hf: continuous,static (one server each)")
    p.add_argument("--clients", default="8", help="concurrent clients, one or a comma-separated list")
    p.add_argument("--models", default="routed,base", help="phases: routed, base (NAME:off)")
    p.add_argument("--requests", type=int, default=32, help="requests per phase and round (bound)")
    p.add_argument("--seconds", type=float, default=120, help="seconds per phase and round (bound)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="each phase runs this many times, interleaved")
    p.add_argument("--with-on", action="store_true", help="also measure NAME:on (adapter for every request)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--threshold", type=float, default=None, help="the servers' gate threshold")
    p.add_argument("--threads", type=int, default=None, help="OMP threads of each server (default: torch's)")
    p.add_argument("--log", default="serve_load_server.log", help="the servers' log files: this + .<server>")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    try:
        args.client_counts = [int(c) for c in args.clients.split(",")]
    except ValueError:
        _fail(f"--clients takes numbers, e.g. 8 or 8,32; got {args.clients!r}")
    engines = _names(args.engines, ENGINES, "--engines")
    schedulers = _names(args.schedulers, SCHEDULERS, "--schedulers")
    if "hf" not in engines and schedulers != ["continuous"]:
        _fail("--schedulers is for the hf engine (vLLM schedules continuously itself)")
    args.servers = [("hf", s) for s in schedulers if "hf" in engines] + [("vllm", None)] * ("vllm" in engines)
    args.model_names = {m: MODELS[m] for m in _names(args.models, tuple(MODELS), "--models")}
    if args.with_on:
        args.model_names["on"] = "prism:on"
    for name in ("requests", "max_tokens", "rounds", "max_batch_size"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.client_counts) < 1:
        _fail("--clients must be >= 1")
    if args.seconds <= 0:
        _fail("--seconds must be > 0")
    if args.checkpoint is not None and not (args.checkpoint / "prism.json").exists():
        _fail(f"{args.checkpoint} is not an exported PRISM checkpoint (no prism.json)")
    return args


def phase_order(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    """(server, clients, model) phases of one round; the servers of one client count and model are
    neighbours in time, so the engine and scheduler ratios compare phases that shared the machine."""
    labels = [server_label(e, s) for e, s in args.servers]
    return [(label, n, m) for n in args.client_counts for m in args.model_names for label in labels]


def compare(args: argparse.Namespace, summary: dict, runs: dict) -> tuple[dict, dict, dict]:
    """(ratios, the routed phases' routing share, hf-vs-vLLM answer agreement) from the pooled phases."""
    labels = [server_label(e, s) for e, s in args.servers]
    hf = [label for label in labels if label.startswith("hf")]
    ratios, shares, agreement = {}, {}, {}
    for n in args.client_counts:
        for model in args.model_names:
            if {"hf-continuous", "hf-static"} <= set(labels):
                cont, stat = summary[f"hf-continuous/{n}/{model}"], summary[f"hf-static/{n}/{model}"]
                ratios[f"continuous/static {n} {model}"] = ratio(cont, stat)
            for h in hf if "vllm" in labels else []:
                name = f"vllm/{h} {n} {model}"
                ratios[name] = ratio(summary[f"vllm/{n}/{model}"], summary[f"{h}/{n}/{model}"])
                agreement[name] = _agreement(runs[("vllm", n, model)], runs[(h, n, model)])
        for label in labels:
            if {"routed", "base"} <= set(args.model_names):
                routed, base = summary[f"{label}/{n}/routed"], summary[f"{label}/{n}/base"]
                ratios[f"routed/base {label} {n}"] = ratio(routed, base)
            if "routed" in args.model_names:
                shares[f"{label} {n}"] = summary[f"{label}/{n}/routed"]["routed_share"]
    return ratios, shares, agreement


def _agreement(runs: list[dict], reference_runs: list[dict]) -> dict:
    """How many of one phase's answers (and routes) equal the reference phase's answer to that prompt."""
    ref: dict[int, dict] = {}
    for rec in (x for run in reference_runs for x in run["records"]):
        ref.setdefault(rec["prompt"], rec)
    recs = [x for run in runs for x in run["records"] if x["prompt"] in ref]
    same_text = sum(x["text"] == ref[x["prompt"]]["text"] for x in recs)
    same_route = sum(x["route"] == ref[x["prompt"]]["route"] for x in recs)
    return {
        "compared": len(recs),
        "identical_answers_share": same_text / len(recs) if recs else None,
        "identical_routes_share": same_route / len(recs) if recs else None,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    checkpoint = args.checkpoint or demo_checkpoint(args.demo_checkpoint)
    info = machine()
    loads = [os.getloadavg()]
    phases = phase_order(args)
    engine_of = {server_label(e, s): e for e, s in args.servers}
    runs: dict[tuple, list[dict]] = {phase: [] for phase in phases}
    servers: dict[str, Server] = {}
    try:
        for engine, sched in args.servers:
            servers[server_label(engine, sched)] = Server(checkpoint, args, engine, sched)
        for server in servers.values():  # warm up: first calls allocate and compile
            n = max(args.client_counts)
            run_phase(server.url, "prism", n, argparse.Namespace(**{**vars(args), "requests": 8}))
        started = time.perf_counter()
        for r in range(args.rounds):
            for phase in phases if r % 2 == 0 else phases[::-1]:
                label, n, model = phase
                result = run_phase(servers[label].url, args.model_names[model], n, args)
                loads.append(os.getloadavg())
                result["load_average_after"] = loads[-1]
                runs[phase].append(result)
                tokens = sum(x["tokens"] for x in result["records"])
                done = len(result["records"])
                rate = tokens / result["wall_s"]
                print(f"round {r + 1} {label:<14} {n:>3} clients {model:<6} {done} requests in "
                      f"{result['wall_s']:.0f} s, {rate:.1f} tok/s, load {loads[-1][0]:.1f}",
                      flush=True)  # fmt: skip
        elapsed = time.perf_counter() - started
    finally:
        for server in servers.values():
            server.stop()

    # within an engine, greedy answers must not depend on the scheduler or on the batch: compare with
    # the engine's first phase's answer to the same prompt
    reference: dict[tuple, str] = {}
    for (label, _, model), rs in runs.items():
        for rec in (x for run in rs for x in run["records"]):
            reference.setdefault((engine_of[label], model, rec["prompt"]), rec["text"])
    summary = {}
    for (label, n, model), rs in runs.items():
        row = pooled(rs)
        texts = [(rec["prompt"], rec["text"]) for run in rs for rec in run["records"]]
        key = engine_of[label], model
        row["answers_differing_from_first_phase"] = sum(t != reference[(*key, k)] for k, t in texts)
        row["requests_per_round"] = [len(run["records"]) for run in rs]
        row["load_average_after_each_round"] = [run["load_average_after"][0] for run in rs]
        summary[f"{label}/{n}/{model}"] = row
    ratios, shares, agreement = compare(args, summary, runs)

    low, high = min(x[0] for x in loads), max(x[0] for x in loads)
    print(f"\n{args.requests} requests or {args.seconds:g} s per phase and round, max_tokens "
          f"{args.max_tokens}, {args.rounds} interleaved rounds pooled ({info['cpu']}, "
          f"{info['cpu_count']} cores, load average {low:.1f}-{high:.1f})")  # fmt: skip
    cols = ["requests", *METRICS, "routed_share"]
    print(f"{'':<26}" + "".join(f"{m:>15}" for m in cols))
    for name, row in summary.items():
        cells = (f"{row[m]:>15.3f}" if row[m] is not None else f"{'-':>15}" for m in cols)
        print(f"{name:<26}" + "".join(cells))
    if ratios:
        print(f"\n{'ratio':<34}" + "".join(f"{'rate ' + m:>22}" for m in RATES) + " |"
              + "".join(f"{'time ' + m:>20}" for m in TIMES))  # fmt: skip
        for name, row in ratios.items():
            fmt = lambda v, w: f"{v:>{w}.3f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
            print(f"{name:<34}" + "".join(fmt(row["rate"][m], 22) for m in RATES) + " |"
                  + "".join(fmt(row["time"][m], 20) for m in TIMES))  # fmt: skip
    for name, row in agreement.items():
        print(f"{name}: {row['compared']} answers compared, identical {row['identical_answers_share']:.3f}, "
              f"same route {row['identical_routes_share']:.3f}")  # fmt: skip
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        plan = {"servers", "client_counts", "model_names"}
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in plan}
        settings["servers"] = [server_label(e, s) for e, s in args.servers]
        info["load_average_after_each_phase"] = loads[1:]
        info["measured_s"] = elapsed
        raw = {f"{s}/{n}/{m}": [{k: v for k, v in run.items() if k != "records"} | {"records": [
            {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items() if k != "text"}
            for rec in run["records"]]} for run in rs] for (s, n, m), rs in runs.items()}  # fmt: skip
        out = {"machine": info, "settings": settings, "summary": summary, "ratios": ratios,
               "routing_share": shares, "engine_agreement": agreement, "runs": raw}  # fmt: skip
        args.json.write_text(json.dumps(out, indent=1) + "\n")  # per-request records: 0.1 ms is plenty
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
