"""The vLLM backend on the real vLLM engine (CPU build) and the embedded SmolLM2-135M: every bootstrap
stage gives rows of the hf backend's schema, greedy answers and teacher targets agree with the hf
backend, and ``evaluate --backend vllm`` runs all five conditions (MMLU, safety; MT-Bench on prism)
with prism's routes equal to hf's.

Engines are slow to start (~20-35 s each on 2 cores): one engine without LoRA (bootstrap, teacher,
judge) and one with LoRA (evaluate on a checkpoint) are shared by every test here (session scope).
"""

from __future__ import annotations

import json

import pytest
import torch

from prism_lightning.testing import write_small_mtbench

vllm = pytest.importorskip("vllm", reason="the vllm extra is not installed")

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.second_tier]

GEN = {"backend": "vllm", "max_model_len": 1024, "max_num_seqs": 16, "cpu_kv_cache_gib": 0.25}
QUERIES = [
    "What is the capital of France?",
    "Give me one tip for learning Python.",
    "Write a haiku about rain.",
    "How do I boil an egg?",
    "Explain what a prime number is.",
    "Name three primary colors.",
]


@pytest.fixture(scope="session")
def hf_backbone():
    from prism_lightning.backbone import BackboneConfig

    return BackboneConfig().load("cpu")


@pytest.fixture(scope="session")
def base_engine():
    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.engines import GenerationConfig
    from prism_lightning.engines.vllm_core import get_engine, shutdown_engines

    engine = get_engine(GenerationConfig(**GEN), BackboneConfig())
    yield engine
    shutdown_engines()


def test_greedy_answers_match_the_hf_backend(base_engine, hf_backbone):
    from prism_lightning.generation import SamplingConfig, generate_batch

    prompts = [hf_backbone.formatter.prompt(q) for q in QUERIES]
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.0)
    ours = base_engine.generate(prompts, sampling)
    theirs = generate_batch(hf_backbone.model, hf_backbone.tokenizer, prompts, sampling)
    same = [a.token_ids == b.token_ids for a, b in zip(ours, theirs, strict=True)]
    print(f"greedy token-for-token match vLLM vs hf: {sum(same)}/{len(same)}")
    assert sum(same) >= len(same) - 1  # fp32 on both sides: all rows measured equal here
    assert [a.finish_reason for a in ours] == [b.finish_reason for b in theirs]
    # per-row seeds: a sampled row does not depend on its batch, and repeats exactly
    hot = SamplingConfig(max_new_tokens=12, temperature=0.9)
    alone = base_engine.generate(prompts[:1], hot, seeds=[7])
    batched = base_engine.generate(prompts, hot, seeds=[7, 1, 2, 3, 4, 5])
    assert alone[0].token_ids == batched[0].token_ids


def test_a_streamed_reply_joins_to_the_generated_one(base_engine):
    """``VLLMEngine.stream`` steps one request through vLLM's engine: its deltas join to the text
    ``generate`` returns for the same prompt and seed, greedy and sampled."""
    from prism_lightning.backbone import BackboneConfig, meta_model
    from prism_lightning.engines.vllm import VLLMEngine
    from prism_lightning.generation import SamplingConfig

    engine = VLLMEngine(base_engine, meta_model(BackboneConfig()), name="base")
    prompt = engine.formatter.prompt(QUERIES[1])
    for sampling in (SamplingConfig(max_new_tokens=16), SamplingConfig(max_new_tokens=16, temperature=0.9)):
        (want,) = engine.generate([prompt], sampling, seeds=[7])
        deltas: list[str] = []
        out = engine.stream(prompt, sampling, deltas.append, seed=7)
        assert "".join(deltas) == out.text == want.text
        assert out.token_ids == want.token_ids and out.finish_reason == want.finish_reason
        assert len(deltas) > 2 and out.route is None


def test_repetition_penalty_and_top_k_follow_the_hf_backend(base_engine, hf_backbone):
    """The bootstrap's filters reach vLLM with the same meaning: a greedy penalised answer matches hf's
    (both penalise prompt and answer tokens), and top_k=1 sampling is greedy."""
    from prism_lightning.generation import SamplingConfig, generate_batch

    prompts = [hf_backbone.formatter.prompt(q) for q in QUERIES]
    penalised = SamplingConfig(max_new_tokens=24, temperature=0.0, repetition_penalty=1.3)
    ours = base_engine.generate(prompts, penalised)
    theirs = generate_batch(hf_backbone.model, hf_backbone.tokenizer, prompts, penalised)
    same = [a.token_ids == b.token_ids for a, b in zip(ours, theirs, strict=True)]
    assert sum(same) >= len(same) - 1
    plain = base_engine.generate(prompts, SamplingConfig(max_new_tokens=24, temperature=0.0))
    assert [a.token_ids for a in ours] != [b.token_ids for b in plain]  # the penalty was applied
    one = SamplingConfig(max_new_tokens=12, temperature=1.5, top_k=1)
    top1 = base_engine.generate(prompts, one, seeds=[3] * 6)
    assert [a.token_ids for a in top1] == [b.token_ids[:12] for b in plain]


def test_teacher_topk_and_option_scores_agree_with_hf(base_engine, hf_backbone):
    from prism_lightning.bootstrap.teacher import response_token_ids, topk_over_response

    tok = hf_backbone.tokenizer
    prompt = hf_backbone.formatter.prompt(QUERIES[4], "You are a patient math teacher.")
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    response = response_token_ids(tok, "A prime number has exactly two divisors: one and itself.", 64)
    k = 16
    [(values, indices)] = base_engine.prompt_topk([(prompt_ids, response)], k)
    hf_values, hf_indices = topk_over_response(hf_backbone.model, prompt_ids, response, k)
    assert values.shape == hf_values.shape == (len(response), k)
    assert values.dtype == hf_values.dtype and indices.dtype == hf_indices.dtype
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(indices, hf_indices, strict=True))
    overlap /= len(response) * k
    with torch.no_grad():  # hf logits -> log-probabilities (vLLM's values), same positions
        ids = torch.tensor([prompt_ids + response])
        logits = hf_backbone.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    hf_logprobs = torch.log_softmax(logits, -1).gather(-1, indices.long())
    diff = (hf_logprobs - values.float()).abs().max().item()
    print(f"teacher top-{k} overlap vLLM vs hf: {overlap:.3f}; max |log-prob diff|: {diff:.4f}")
    assert overlap >= 0.95
    assert diff < 0.05  # fp16 storage of values around -1..-20 rounds by up to ~0.008
    # next-token log-probabilities of given tokens (verdict options, MMLU letters)
    letters = [tok(t, add_special_tokens=False)["input_ids"][0] for t in ("A", " B")]
    scores = base_engine.next_token_logprobs([prompt], letters)
    with torch.no_grad():
        last = hf_backbone.model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float()
    assert torch.allclose(scores[0], torch.log_softmax(last, -1)[letters], atol=1e-3)


def _key_shape(row):
    return {k: sorted(v) if isinstance(v, dict) else type(v).__name__ for k, v in row.items()}


def test_bootstrap_stages_on_vllm(base_engine, hf_backbone, tmp_path):
    from prism_lightning.backbone import BackboneConfig
    from prism_lightning.bootstrap import answers, queries, teacher, verdicts
    from prism_lightning.bootstrap.runner import run_bootstrap, stage_stores
    from prism_lightning.engines.hf import HFEngine
    from prism_lightning.generation import SamplingConfig
    from prism_lightning.testing import tiny_bootstrap_config

    config = tiny_bootstrap_config(
        queries_per_persona=2,
        query_max_new_tokens=24,
        answer_max_new_tokens=12,
        judge_max_new_tokens=4,
        min_query_chars=8,
        generation=GEN,
    )
    result = run_bootstrap(config, BackboneConfig(), tmp_path / "run", keep_engines=True)
    assert result.summary["backend"] == "vllm"
    rows = {name: result.rows(name) for name in ("queries", "answers", "verdicts", "teacher")}
    assert rows["queries"] and rows["answers"]
    assert all("\n" not in r["query"] for r in rows["queries"])  # the line-break rule
    assert len(rows["verdicts"]) == len(rows["answers"])
    # the same stages on hf (one job each) give rows of the same schema
    bb = hf_backbone
    hf = HFEngine.from_backbone(bb)
    q_job = queries.query_jobs(bb.formatter, result.personas[:1], 1)
    hf_q = queries.QueryTask(hf, SamplingConfig(max_new_tokens=4, temperature=0.9), 0).process(q_job)
    vq = result.stages["queries"].read_shards()
    assert _key_shape(hf_q[0]) == _key_shape(next(iter(vq.values())))
    by_name = {c.name: c for c in result.personas}
    a_job = answers.answer_jobs(bb.formatter, rows["queries"][:1], by_name, "short", "system")
    hf_a = answers.AnswerTask(hf, SamplingConfig(max_new_tokens=4, temperature=0.7), 0).process(a_job)
    assert _key_shape(hf_a[0]) == _key_shape(rows["answers"][0])
    v_job = verdicts.verdict_jobs(bb.formatter, rows["answers"][:1])
    hf_v = verdicts.VerdictTask(hf, 4, "logprob").process(v_job)
    assert _key_shape(hf_v[0]) == _key_shape(rows["verdicts"][0])
    for order in verdicts.ORDERS:
        assert sorted(hf_v[0][order]["logprobs"]) == sorted(rows["verdicts"][0][order]["logprobs"])
    # the judged pair scored on both backends: same option log-probabilities (greedy, same prompt)
    ours = [r for r in rows["verdicts"] if r["id"] == hf_v[0]["id"]][0]
    for order in verdicts.ORDERS:
        for opt, value in hf_v[0][order]["logprobs"].items():
            assert ours[order]["logprobs"][opt] == pytest.approx(value, abs=1e-2)
    # teacher rows: hf's fields, tensors that load through the training loader
    distill = [r for r in rows["verdicts"] if r["gate_target"] == 1]
    assert len(rows["teacher"]) == len(distill)
    if rows["teacher"]:
        t_job = teacher.teacher_jobs(bb.formatter, distill[:1], {r["id"]: r for r in rows["answers"]},
                                     by_name, "short", "system")  # fmt: skip
        hf_t = teacher.TeacherTask(hf, config.teacher_top_k, config.max_response_tokens).process(t_job)
        hf_t[0].pop("_tensors")
        ours_t = rows["teacher"][0]
        assert set(ours_t) - {"tensor_file"} == set(hf_t[0])
        assert ours_t["n_tokens"] == hf_t[0]["n_tokens"] and ours_t["top_k"] == hf_t[0]["top_k"]
        loaded = teacher.load_teacher_targets(result.stage_dirs["teacher"], rows["teacher"])
        assert loaded[ours_t["id"]]["values"].dtype == torch.float16
    # the backend is part of every stage hash: hf rows and vLLM rows never share a directory
    hf_stores = stage_stores(tiny_bootstrap_config(**{**config.__dict__, "generation": None}),
                             BackboneConfig(), tmp_path / "run")  # fmt: skip
    for name, store in result.stages.items():
        assert store.path != hf_stores[name].path
    summary = json.loads(result.summary_path.read_text())
    assert any("vLLM" in m for m in summary["models_loaded"])
    # a second run finds every stage cached
    again = run_bootstrap(config, BackboneConfig(), tmp_path / "run", keep_engines=True)
    assert all(stage["cached"] for stage in again.summary["stages"].values())


# ------------------------------------------------------------------------------------------------
# evaluate --backend vllm on an exported checkpoint of the embedded model


@pytest.fixture(scope="session")
def embedded_checkpoint(tmp_path_factory):
    """The embedded model with a visible random adapter (LoRA on layers 1-29) and a gate whose
    threshold splits the test prompts, exported as `fit` exports it."""
    from prism_lightning.testing import untrained_checkpoint

    return untrained_checkpoint(
        "smollm2-135m-instruct", tmp_path_factory.mktemp("ckpt") / "embedded", lora_std=0.02,
        lora_params="lora_B", prepare=standardise_gate_input, gate_std=3.0,
        lora_rank=8, lora_alpha=16, gate_hidden=[16],
    )  # fmt: skip


def standardise_gate_input(module) -> None:
    """Standardise the gate's input over varied prompts, so its probabilities spread (no training)."""
    from prism_lightning.generation import left_pad

    tok = module.tokenizer
    rows = [tok(module.formatter.prompt(q), add_special_tokens=False)["input_ids"] for q in QUERIES]
    ids, mask = left_pad(rows, tok.pad_token_id)
    feats = module.controller.gate_features(ids, mask).float()
    module.gate.set_feature_stats(feats.mean(0), feats.std(0))


@pytest.fixture(scope="session")
def kway_checkpoint(tmp_path_factory):
    """A K-way export of the embedded model: two visible random adapters and a 3-way gate."""
    from prism_lightning.testing import untrained_checkpoint

    return untrained_checkpoint(
        "smollm2-135m-instruct", tmp_path_factory.mktemp("ckpt") / "kway", lora_std=0.02,
        lora_params="lora_B", prepare=standardise_gate_input, gate_std=3.0, lora_rank=8, lora_alpha=16,
        gate_hidden=[16], adapters={"numbers": ["math"], "code": ["coding"]}, personas=("math", "coding"),
    )  # fmt: skip


def _eval_args(ckpt, out, mt, *extra):
    return [
        "--checkpoint", str(ckpt), "--out", str(out), "--limit", "2", "--device", "cpu", "--dtype", "float32",
        *mt, "--mtbench_max_new_tokens", "4", "--safety_max_new_tokens", "4", "--judge_mode", "logprob",
        "--ci_resamples", "50", *extra,
    ]  # fmt: skip


def test_evaluate_on_vllm_all_conditions(embedded_checkpoint, tmp_path):
    from conftest import benchmark_assets_missing

    from prism_lightning.eval.cli import evaluate_main
    from prism_lightning.eval.conditions import CONDITIONS

    missing = benchmark_assets_missing()
    if missing:
        pytest.skip(missing)
    mt = write_small_mtbench(tmp_path, turns=lambda qid, cat: [f"Tell me about {cat}.", "Why?"])
    vllm_args = ["--backend", "vllm", "--vllm", "max_model_len=1024", "--vllm", "max_num_seqs=16",
                 "--vllm", "cpu_kv_cache_gib=0.25", "--vllm", "max_lora_rank=8"]  # fmt: skip
    out_v, out_h, out_mt = tmp_path / "vllm", tmp_path / "hf", tmp_path / "vllm-mtbench"
    # all five conditions on MMLU and safety; MT-Bench's two turns (the first turn's route holds) on prism
    both = ["--benchmarks", "mmlu,safety"]
    assert evaluate_main(_eval_args(embedded_checkpoint, out_v, mt, *vllm_args, *both)) == 0
    mt_args = ["--benchmarks", "mtbench", "--conditions", "prism"]
    assert evaluate_main(_eval_args(embedded_checkpoint, out_mt, mt, *vllm_args, *mt_args)) == 0
    hf_args = ["--conditions", "prism", "--benchmarks", "mmlu"]  # hf's routes on the MMLU prompts
    assert evaluate_main(_eval_args(embedded_checkpoint, out_h, mt, *hf_args)) == 0
    v = json.loads((out_v / "summary.json").read_text())
    h = json.loads((out_h / "summary.json").read_text())
    assert v["backend"] == "vllm" and h["backend"] == "hf"
    assert set(v) == set(h)  # the same summary schema
    assert list(v["conditions_config"]) == list(CONDITIONS)
    assert set(v["runs"]) == {f"{b}/{c}" for b in ("mmlu", "safety") for c in CONDITIONS}
    for bench in ("mmlu",):
        rows_v = {r["id"]: r for r in map(json.loads, (out_v / "items" / f"{bench}__prism.jsonl").open())}
        rows_h = {r["id"]: r for r in map(json.loads, (out_h / "items" / f"{bench}__prism.jsonl").open())}
        assert set(rows_v) == set(rows_h)
        assert all(r["backend"] == "vllm" for r in rows_v.values())
        # prism's routes: the prefix gate outside vLLM decides as the hf routed model does
        assert {i: r["route"] for i, r in rows_v.items()} == {i: r["route"] for i, r in rows_h.items()}
        for i, r in rows_v.items():
            assert r["gate_prob"] == pytest.approx(rows_h[i]["gate_prob"], abs=1e-4)
        assert set(next(iter(rows_v.values()))) == set(next(iter(rows_h.values())))
    routes = [json.loads(line)["route"] for line in (out_v / "items" / "mmlu__prism.jsonl").open()]
    print(f"prism routes on vLLM (mmlu): {sum(routes)}/{len(routes)} on, equal to hf")
    assert 0 < sum(routes) < len(routes)  # both kinds of request were sent
    for out, bench in ((out_v, "safety"), (out_mt, "mtbench")):  # gated rows carry the gate's decision
        rows = [json.loads(line) for line in (out / "items" / f"{bench}__prism.jsonl").open()]
        assert rows and all(isinstance(r["route"], bool) and 0.0 <= r["gate_prob"] <= 1.0 for r in rows)
        assert all(r["backend"] == "vllm" for r in rows)
    mt_rows = map(json.loads, (out_mt / "items" / "mtbench__prism.jsonl").open())
    assert all(len(r["answers"]) == 2 for r in mt_rows)
    # the lora condition really runs the adapter: its MMLU scores differ from base's
    base = [json.loads(x)["logprobs"] for x in (out_v / "items" / "mmlu__base.jsonl").open()]
    lora = [json.loads(x)["logprobs"] for x in (out_v / "items" / "mmlu__lora.jsonl").open()]
    assert base != lora


def test_a_routed_stream_on_vllm_takes_generates_routes_and_text(embedded_checkpoint):
    """``VLLMEngine.stream`` on a checkpoint: gated, forced and a conversation routed on its first turn
    give the route, gate probability and text ``generate`` gives, the route heard before the deltas."""
    from prism_lightning.engines import GenerationConfig, open_engine
    from prism_lightning.generation import SamplingConfig

    engine = open_engine(embedded_checkpoint, GenerationConfig(**GEN, max_lora_rank=8))
    fmt, sampling = engine.formatter, SamplingConfig(max_new_tokens=8)
    cases = [(fmt.prompt(q), "gated", None, None) for q in QUERIES]
    cases += [(fmt.prompt(QUERIES[0]), "on", None, None), (fmt.prompt(QUERIES[1]), "gated", False, None)]
    cases.append(
        (fmt.prompt([QUERIES[2], "And then?"], replies=["Sure."]), "gated", None, fmt.prompt(QUERIES[2]))
    )
    routes = set()
    for prompt, mode, route, first_turn in cases:
        decider = [first_turn] if first_turn is not None else [prompt]
        (decided,) = engine.generate(decider, sampling, mode=mode, route=None if route is None else [route])
        (want,) = engine.generate([prompt], sampling, mode=mode, route=[decided.route])
        heard, deltas = [], []
        out = engine.stream(
            prompt,
            sampling,
            deltas.append,
            mode=mode,
            route=route,
            first_turn=first_turn,
            on_route=heard.append,
        )
        assert "".join(deltas) == out.text == want.text
        assert [h.route for h in heard] == [out.route] == [decided.route]
        assert out.gate_prob == pytest.approx(decided.gate_prob, abs=1e-6)
        routes.add(out.route)
    assert routes == {True, False}


def test_prism_k_on_vllm_routes_as_on_hf(kway_checkpoint, tmp_path):
    """A K-way checkpoint on vLLM: the prefix gate and the routing rule pick, per request, none or one of
    the adapters (a LoRARequest each) exactly as the hf engine's single-pass routing does."""
    from conftest import benchmark_assets_missing

    from prism_lightning.engines import GenerationConfig, open_engine
    from prism_lightning.eval.cli import evaluate_main
    from prism_lightning.generation import SamplingConfig

    gen = GenerationConfig(**GEN, max_lora_rank=8)
    vllm_engine, hf_engine = open_engine(kway_checkpoint, gen), open_engine(kway_checkpoint)
    prompts = [hf_engine.formatter.prompt(q) for q in QUERIES]
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    ours = vllm_engine.generate(prompts, sampling, mode="gated_k")
    theirs = hf_engine.generate(prompts, sampling, mode="gated_k")
    print(f"prism_k adapters on vLLM: {[o.adapter for o in ours]}")
    assert [o.adapter for o in ours] == [o.adapter for o in theirs]
    assert [o.route for o in ours] == [o.route for o in theirs]
    assert [o.gate_prob for o in ours] == pytest.approx([o.gate_prob for o in theirs], abs=1e-4)
    assert len({o.adapter for o in ours}) > 1  # more than one route was sent
    # a forced route per row (none, or an adapter by name) scores the options on both engines alike
    forced = ["numbers", "code", False, "code", None, "numbers"]
    letters = [[" A"], [" B"], [" C"], [" D"]]
    got = vllm_engine.option_logprobs(prompts, letters, mode="gated_k", route=forced)
    want = hf_engine.option_logprobs(prompts, letters, mode="gated_k", route=forced)
    assert got.adapters == want.adapters and got.routes == want.routes
    assert got.adapters[:4] == ["numbers", "code", None, "code"]  # False: the base model
    assert torch.allclose(got.scores, want.scores, atol=1e-3)
    missing = benchmark_assets_missing()
    if missing:
        pytest.skip(missing)
    vllm_args = ["--backend", "vllm", "--vllm", "max_model_len=1024", "--vllm", "max_num_seqs=16",
                 "--vllm", "cpu_kv_cache_gib=0.25", "--vllm", "max_lora_rank=8"]  # fmt: skip
    mt = write_small_mtbench(tmp_path)
    # the raw MMLU prompt: routed on the chat prompt, then scored with the chosen adapter (a forced route)
    args = ["--conditions", "prism_k", "--benchmarks", "mmlu", "--mmlu_format", "raw"]
    out_v, out_h = tmp_path / "vllm", tmp_path / "hf"
    assert evaluate_main(_eval_args(kway_checkpoint, out_v, mt, *vllm_args, *args)) == 0
    assert evaluate_main(_eval_args(kway_checkpoint, out_h, mt, *args)) == 0
    rows_v = {r["id"]: r for r in map(json.loads, (out_v / "items" / "mmlu__prism_k.jsonl").open())}
    rows_h = {r["id"]: r for r in map(json.loads, (out_h / "items" / "mmlu__prism_k.jsonl").open())}
    assert rows_v and set(rows_v) == set(rows_h)
    assert {i: r["route"] for i, r in rows_v.items()} == {i: r["route"] for i, r in rows_h.items()}
    assert {i: r["adapter"] for i, r in rows_v.items()} == {i: r["adapter"] for i, r in rows_h.items()}
    print(f"prism_k adapters on raw MMLU: {[r['adapter'] for r in rows_v.values()]}")
    for i, r in rows_v.items():
        assert r["gate_prob"] == pytest.approx(rows_h[i]["gate_prob"], abs=1e-4)
        assert r["logprobs"] == pytest.approx(rows_h[i]["logprobs"], abs=1e-3)


def test_the_serve_engine_honours_top_k_and_repetition_penalty(embedded_checkpoint):
    """`serve --engine vllm` maps sampling settings through the same function as the batch engine:
    top_k=1 sampling is greedy, and a greedy penalised answer equals the batch engine's. Last in this
    file: stopping a serve engine stops every engine of the process."""
    import asyncio

    from prism_lightning.engines.hf_stream import RowSpec
    from prism_lightning.generation import SamplingConfig
    from prism_lightning.serve.vllm_engine import VLLMServeEngine

    engine = VLLMServeEngine(embedded_checkpoint, max_model_len=1024, max_num_seqs=16)
    ids = engine.vllm.token_ids([engine.formatter.prompt(QUERIES[2])])[0]

    async def answer(sampling: SamplingConfig, seed: int = 0) -> str:
        job = engine.submit(RowSpec(ids, sampling, seed=seed, route=False), [], "off")
        pieces = []
        while (event := await job.events.get()).kind not in ("done", "error"):
            pieces.append(event.text)
        assert event.kind == "done", event.text
        return "".join(pieces).strip()

    plain = SamplingConfig(max_new_tokens=12, temperature=0.0)
    top1 = SamplingConfig(max_new_tokens=12, temperature=1.5, top_k=1)
    penalised = SamplingConfig(max_new_tokens=12, temperature=0.0, repetition_penalty=1.3)
    engine.start()
    try:
        greedy = asyncio.run(answer(plain))
        assert asyncio.run(answer(top1, seed=3)) == greedy
        served = asyncio.run(answer(penalised))
        batch = engine.vllm.generate([ids], penalised)[0].text  # the worker idles: the engine is free
    finally:
        engine.stop()
    assert served == batch and served != greedy
